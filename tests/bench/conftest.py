"""Bench fixtures live in tests/bench/live.py (shared with tests/test_dashboard.py and tests/test_grafana.py)."""

from tests.bench.live import (  # noqa: F401
    bench_tokenizer_dir, live_gateway, live_server, replica_url,
)
