"""Bench test fixtures: a small real tokenizer, test-replica servers and a live `tokenmill serve` (all
subprocesses on free loopback ports, stopped by PID). Imported by tests/bench/conftest.py and the root
dashboard / Grafana tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
CORPUS = (
    "the quick brown fox jumps over the lazy dog. serving large language models needs paged attention, "
    "continuous batching and careful scheduling. tokens stream back to clients as server sent events. "
    "def main(): return sum(x * x for x in range(10))  # code and math 1 + 2 = 3, 42 * 7 = 294\n"
) * 20


def build_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer trained on a tiny corpus, saved in HF format (a real tokenizer, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def bench_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("bench_tok"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_replica(tokenizer_dir: Path, name: str, token_delay: float) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.openai_replica", "--port", str(port), "--tokenizer",
         str(tokenizer_dir), "--token-delay", str(token_delay), "--model-name", name], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/v1/models", proc)
    except Exception:
        stop(proc)
        raise
    return url, proc


@pytest.fixture(scope="session")
def replica_url(bench_tokenizer_dir: Path) -> Iterator[str]:
    url, proc = start_replica(bench_tokenizer_dir, "replica-a", token_delay=0.002)
    yield url
    stop(proc)


# Fixtures imported into several test modules get one pytest FixtureDef each; this reference-counted cache
# makes them share one process per session instead of starting a server per importing module.
_SHARED: dict[str, list] = {}


def _acquire(key: str, start) -> str:
    if key not in _SHARED:
        url, proc = start()
        _SHARED[key] = [url, proc, 0]
    _SHARED[key][2] += 1
    return _SHARED[key][0]


def _release(key: str) -> None:
    entry = _SHARED[key]
    entry[2] -= 1
    if entry[2] == 0:
        stop(entry[1])
        del _SHARED[key]


@pytest.fixture(scope="session")
def live_server(tiny_server) -> str:
    """The SERVER area's session `tokenmill serve` on the tiny Llama (served as "tiny"): its base URL."""
    return tiny_server.url


def start_gateway(replica_urls: list[str]) -> tuple[str, subprocess.Popen]:
    """`tokenmill gateway --replica ...` (quick form, one pool) on a free port."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    code = "import typer; from tokenmill.gateway.cli import gateway_command; typer.run(gateway_command)"
    args = [a for u in replica_urls for a in ("--replica", u)] + ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/health", proc, timeout_s=60.0)
    except Exception:
        stop(proc)
        raise
    return url, proc


@pytest.fixture(scope="session")
def live_gateway(live_server: str) -> Iterator[str]:
    """The gateway in front of the live `tokenmill serve`."""
    yield _acquire("gateway", lambda: start_gateway([live_server]))
    _release("gateway")
