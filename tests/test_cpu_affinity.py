"""Core lists, placement checks, per-replica core shares, and pinning applied in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokenmill.cpu_affinity import (
    format_cpu_list,
    parse_cpu_list,
    plan_core_shares,
    resolve_placement,
)
from tokenmill.engine.args import engine_config


@pytest.mark.parametrize("text, cores", [
    ("0-3", (0, 1, 2, 3)), ("0,2,4", (0, 2, 4)), ("0-1,4", (0, 1, 4)), ("3", (3,)), ("4,0-1", (0, 1, 4)),
    ("0-1,1-2", (0, 1, 2)), (" 0 , 2 ", (0, 2)), ([1, 0], (0, 1)),
])
def test_parse_cpu_list_accepts_vllm_style_lists(text, cores):
    assert parse_cpu_list(text) == cores


@pytest.mark.parametrize("text, why", [
    ("", "'' is not a core id"), ("a", "'a' is not a core id"), ("0-", "'0-' is not a core id"),
    ("3-1", "range '3-1' must run from a lower"), ("-1", "'-1' is not a core id"), ("0,,1", "'' is not a core id"),
    ([], "must be non-negative core ids"), ([-1], "must be non-negative core ids"),
])
def test_parse_cpu_list_rejects_bad_lists_naming_the_field(text, why):
    with pytest.raises(ValueError) as e:
        parse_cpu_list(text)
    assert str(e.value).startswith("invalid cpu_cores=") and why in str(e.value)


@pytest.mark.parametrize("cores, text", [((0, 1, 2, 5), "0-2,5"), ((7,), "7"), ((0, 2, 4), "0,2,4"), ((), "")])
def test_format_cpu_list_is_the_compact_form_parse_reads(cores, text):
    assert format_cpu_list(cores) == text
    if cores:
        assert parse_cpu_list(text) == cores


def test_resolve_placement_defaults_threads_to_the_cores():
    p = resolve_placement(None, None, available=(0, 1, 2, 3))
    assert (p.cores, p.num_threads, p.pinned) == ((0, 1, 2, 3), 4, False)
    p = resolve_placement(None, (2, 3), available=(0, 1, 2, 3))
    assert (p.cores, p.num_threads, p.pinned) == ((2, 3), 2, True)
    assert resolve_placement(3, (1,), available=(0, 1)).num_threads == 3  # explicit threads win


def test_resolve_placement_rejects_unavailable_cores_and_names_the_allowed_ones():
    with pytest.raises(ValueError) as e:
        resolve_placement(None, (1, 5, 6), available=(0, 1, 2))
    assert str(e.value) == "invalid cpu_cores=1,5-6: core(s) 5-6 not available; this process may use cores 0-2"
    with pytest.raises(ValueError, match="invalid num_threads=0: must be a positive integer"):
        resolve_placement(0, None, available=(0,))


def test_engine_config_takes_vllm_style_cpu_cores():
    last = max(os.sched_getaffinity(0))
    cfg = engine_config("m", cpu_cores=f"{last}", num_threads=2)
    assert (cfg.cpu_cores, cfg.num_threads) == ((last,), 2)
    assert engine_config("m").cpu_cores is None
    with pytest.raises(ValueError, match=r"invalid cpu_cores=.*not available; this process may use cores"):
        engine_config("m", cpu_cores=[last + 1])


@pytest.mark.parametrize("cores, n, shares", [
    ((0, 1), 2, [(0,), (1,)]),
    ((0, 1, 2, 3), 2, [(0, 1), (2, 3)]),
    ((0, 1, 2, 3, 4), 2, [(0, 1, 2), (3, 4)]),
    ((0, 1, 2, 3, 4, 5, 6), 3, [(0, 1, 2), (3, 4), (5, 6)]),
    ((4, 6), 1, [(4, 6)]),
    ((0, 1), 3, [(0,), (1,), (0,)]),  # more replicas than cores: one core each, shared round-robin
])
def test_plan_core_shares_splits_disjointly(cores, n, shares):
    assert plan_core_shares(cores, n) == shares


def test_plan_core_shares_are_disjoint_and_cover_every_core():
    cores = tuple(range(16))
    for n in range(1, 17):
        shares = plan_core_shares(cores, n)
        flat = [c for s in shares for c in s]
        assert sorted(flat) == list(cores) and len(shares) == n
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


_APPLY = """
import json, os, sys, threading, time
import torch
from tokenmill.cpu_affinity import apply_placement
stop = threading.Event()
t = threading.Thread(target=stop.wait); t.start()   # a thread started before pinning must be pinned too
cores = json.loads(sys.argv[1]); threads = json.loads(sys.argv[2])
p = apply_placement(threads, cores)
tasks = {int(tid): sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
stop.set(); t.join()
print(json.dumps({"torch": torch.get_num_threads(), "placement": [list(p.cores), p.num_threads],
                  "tasks": list(tasks.values())}))
"""


def _apply_in_fresh_process(cores, threads) -> dict:
    out = subprocess.run([sys.executable, "-c", _APPLY, json.dumps(cores), json.dumps(threads)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_apply_placement_pins_every_thread_and_sets_torch_threads():
    last = max(os.sched_getaffinity(0))
    got = _apply_in_fresh_process([last], None)
    assert got["torch"] == 1 and got["placement"] == [[last], 1]
    assert len(got["tasks"]) >= 2 and all(t == [last] for t in got["tasks"])


def test_apply_placement_without_cores_uses_the_affinity_mask_not_cpu_count():
    allowed = sorted(os.sched_getaffinity(0))
    got = _apply_in_fresh_process(None, None)
    assert got["torch"] == len(allowed) and got["placement"] == [allowed, len(allowed)]
    got = _apply_in_fresh_process(None, 3)
    assert got["torch"] == 3
