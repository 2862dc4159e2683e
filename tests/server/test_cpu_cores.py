"""`tokenmill serve --cpu-cores / --num-threads`: the engine core process is pinned; bad lists get one line."""

from __future__ import annotations

import os
import re

import httpx
import typer
from typer.testing import CliRunner

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server
from tokenmill.server.cli import serve_command


def test_serve_pins_the_engine_core_to_the_given_cores(tiny_llama_dir, tmp_path):
    last = max(os.sched_getaffinity(0))
    server = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--cpu-cores", str(last), tmp_dir=tmp_path)
    try:
        core_pid = httpx.get(server.url + "/debug/stats", timeout=10).json()["core_pid"]
        tids = os.listdir(f"/proc/{core_pid}/task")
        assert all(os.sched_getaffinity(int(t)) == {last} for t in tids)
        with open(f"/proc/{core_pid}/status") as f:
            assert f"Cpus_allowed_list:\t{last}\n" in f.read()
        assert f"engine: 1 thread(s), pinned to core(s) {last}" in server.log()
    finally:
        assert server.stop() == 0


def _serve(*args: str) -> tuple[int, str]:
    """Exit code and the output with rich's error box and line wrapping taken out."""
    app = typer.Typer()
    app.command()(serve_command)
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())


def test_serve_rejects_bad_core_lists_in_one_line():
    allowed = sorted(os.sched_getaffinity(0))
    code, out = _serve("--cpu-cores", f"0-{allowed[-1] + 2}")
    assert code == 2 and "Traceback" not in out
    assert (f"Invalid value for --cpu-cores: 0-{allowed[-1] + 2}: core(s) {allowed[-1] + 1}-{allowed[-1] + 2} "
            "not available; this process may use cores") in out
    code, out = _serve("--cpu-cores", "two")
    assert code == 2 and "Invalid value for --cpu-cores: 'two': 'two' is not a core id or a range" in out
    code, out = _serve("--num-threads", "0")
    assert code == 2 and "Invalid value for --num-threads: 0: must be a positive integer" in out
