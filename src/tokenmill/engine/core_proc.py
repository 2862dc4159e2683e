"""The engine core process: ModelRunner + EngineCore stepping in a loop, fed over ZeroMQ.

Wire format (msgpack arrays, first element a str tag):
  client -> core  ["add", EngineCoreRequest.to_wire()]   ["abort", [ids]]   ["embed", call_id, [[ids]]]
                  ["utility", call_id, method, [args]]   ["shutdown"]
  core -> client  ["ready", info, pickled tokenizer]       ["out", [delta rows], stats, {request_id: wait_s}]
                  ["stats", stats]   ["embed", call_id, vectors, error]   ["fatal", message]
                  ["utility", call_id, result, error]  (error: None or [is_value_error, message])
A delta row is SeqOutputDelta's fields in declaration order (see delta_to_row). The core never waits on
the client: inputs are drained without blocking between steps, and it blocks only when idle.
This module imports no torch; the runner is imported inside `run_core`, in the child process.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
from dataclasses import asdict, fields
from typing import Any

import msgpack

from tokenmill.config import EngineConfig
from tokenmill.cpu_affinity import format_cpu_list, pin_process, resolve_placement
from tokenmill.engine.outputs import SeqOutputDelta
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.stats import SchedulerStats
from tokenmill.memory import release_free_memory

log = logging.getLogger("tokenmill.engine.core")

_DELTA_FIELDS = [f.name for f in fields(SeqOutputDelta)]
_IDLE_POLL_MS = 500  # how often the core checks that its parent is still alive
_PRUNE_EVERY_STEPS = 512  # how often finished requests are dropped from the first-scheduled bookkeeping
# EngineCore methods a client may call between steps (server-side LoRA loading / unloading).
UTILITY_METHODS = frozenset({"add_lora", "remove_lora"})


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def delta_to_row(d: SeqOutputDelta) -> list[Any]:
    return [getattr(d, name) for name in _DELTA_FIELDS]


def delta_from_row(row: list[Any]) -> SeqOutputDelta:
    d = SeqOutputDelta(**dict(zip(_DELTA_FIELDS, row)))
    if d.new_top_logprobs is not None:  # msgpack turns tuples into lists
        d.new_top_logprobs = [[(int(t), float(lp)) for t, lp in step] for step in d.new_top_logprobs]
    return d


def stats_to_wire(s: SchedulerStats) -> dict[str, Any]:
    return asdict(s)


def stats_from_wire(d: dict[str, Any]) -> SchedulerStats:
    return SchedulerStats(**d)


class _TimedRunner:
    """Wraps the runner to note when each request is first scheduled (for the queue-time metric)."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.first_scheduled: dict[str, float] = {}  # request_id -> wall time, until reported
        self.seen: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def execute(self, sched: Any) -> Any:
        now = time.time()
        for s in sched.seqs:
            rid = s.seq_id.rpartition("#")[0] or s.seq_id
            if rid not in self.seen:
                self.seen.add(rid)
                self.first_scheduled[rid] = now
        return self._runner.execute(sched)


def model_info(config: EngineConfig, runner: Any, core: Any) -> dict[str, Any]:
    from tokenmill.engine.inproc_client import model_info_of

    info = model_info_of(config, runner, core)
    loaded = runner.loaded
    info.update(pid=os.getpid(), arch=loaded.arch, dtype=str(loaded.dtype).replace("torch.", ""),
                device=str(loaded.device))
    placement = getattr(runner, "cpu_placement", None)
    if placement is not None:
        info.update(num_threads=placement.num_threads, cpu_cores=format_cpu_list(placement.cores))
    return info


def _pin_early(config: EngineConfig) -> None:
    """Pin to config.cpu_cores before zmq and torch start their threads, so every thread inherits the cores.
    A core list this process may not use is left to the runner (apply_placement), which fails the start
    with a message naming --cpu-cores."""
    if config.cpu_cores is None:
        return
    try:
        placement = resolve_placement(config.num_threads, config.cpu_cores)
    except ValueError:
        return
    pin_process(placement.cores)


def run_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int) -> None:
    """Process entry (multiprocessing spawn target). Returns when told to shut down or orphaned."""
    import signal

    import zmq

    # The parent owns this process's lifetime: a terminal's Ctrl+C or a process-group SIGTERM must not kill
    # the core while the server drains; the server stops it with a "shutdown" message (or SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [core] %(message)s")
    _pin_early(config)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(output_addr)
    try:
        from tokenmill.engine.core import EngineCore
        from tokenmill.executor.model_runner import ModelRunner

        runner = _TimedRunner(ModelRunner(config))
        core = EngineCore(config, runner) if runner.loaded.task == "generate" else None
        tokenizer = pickle.dumps(runner.loaded.tokenizer)
        # The server gets its own copy; this one and the load's temporaries are ~0.6 GB of heap to give back
        # (before "ready", so the server's start log sees the core's resident memory as it stays).
        runner.loaded.tokenizer = None
        release_free_memory()
        out.send(pack(["ready", model_info(config, runner, core), tokenizer]))
        _loop(core, runner, inp, out, parent_pid)
    except Exception as exc:  # noqa: BLE001 - the client must learn why the core is gone
        log.error("engine core failed: %s", traceback.format_exc())
        out.send(pack(["fatal", f"{type(exc).__name__}: {exc}"]))
    finally:
        inp.close(0)
        out.close()
        ctx.term()


def _loop(core: Any, runner: _TimedRunner, inp: Any, out: Any, parent_pid: int) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    next_parent_check = time.monotonic() + _IDLE_POLL_MS / 1000
    steps = 0
    while True:
        busy = core is not None and core.has_unfinished()
        events = dict(poller.poll(0 if busy else _IDLE_POLL_MS))
        got = False
        if inp in events:
            while True:
                try:
                    msg = unpack(inp.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                got = True
                if _handle(msg, core, runner, out) == "shutdown":
                    return
        if core is not None and core.has_unfinished():
            deltas = core.step()
            waits = {}
            if runner.first_scheduled:
                waits, runner.first_scheduled = runner.first_scheduled, {}
            out.send(pack(["out", [delta_to_row(d) for d in deltas], stats_to_wire(core.stats()), waits]))
            steps += 1
            if not core.has_unfinished():
                runner.seen.clear()
            elif steps % _PRUNE_EVERY_STEPS == 0:  # under constant load the set would only grow
                runner.seen.intersection_update(core.scheduler.requests.keys())
        elif got and core is not None:
            out.send(pack(["stats", stats_to_wire(core.stats())]))  # e.g. after an abort freed blocks
        if time.monotonic() >= next_parent_check:
            next_parent_check = time.monotonic() + _IDLE_POLL_MS / 1000
            if os.getppid() != parent_pid:
                log.warning("parent process %d is gone; engine core exiting", parent_pid)
                return


def _handle(msg: list[Any], core: Any, runner: _TimedRunner, out: Any) -> str | None:
    kind = msg[0]
    if kind == "add":
        try:
            if core is None:
                raise ValueError("this model serves embeddings only (task=embed)")
            core.add_request(EngineCoreRequest.from_wire(msg[1]))
        except (ValueError, TypeError) as exc:
            rid = msg[1]["request_id"]
            n = int(msg[1]["params"].get("n", 1))
            rows = [delta_to_row(SeqOutputDelta(request_id=rid, index=i, new_token_ids=[], finish_reason="error",
                                                error=str(exc))) for i in range(n)]
            stats = stats_to_wire(core.stats()) if core is not None else stats_to_wire(SchedulerStats())
            out.send(pack(["out", rows, stats, {}]))
    elif kind == "abort":
        if core is not None:
            core.abort(list(msg[1]))
    elif kind == "embed":
        call_id, batch = msg[1], msg[2]
        try:
            vectors = runner.embed([list(ids) for ids in batch])
            out.send(pack(["embed", call_id, [[float(x) for x in v] for v in vectors], None]))
        except Exception as exc:  # noqa: BLE001 - fails this call only
            out.send(pack(["embed", call_id, None, f"{type(exc).__name__}: {exc}"]))
    elif kind == "utility":
        out.send(pack(["utility", msg[1], *call_utility(core, msg[2], msg[3])]))
    elif kind == "shutdown":
        return "shutdown"
    return None


def call_utility(core: Any, method: str, args: list[Any]) -> tuple[Any, list[Any] | None]:
    """(result, None) or (None, [is_value_error, message]): a failed call fails alone, the core goes on."""
    try:
        if core is None:
            raise ValueError("this model serves embeddings only (task=embed)")
        if method not in UTILITY_METHODS:
            raise ValueError(f"unknown engine utility {method!r}")
        return getattr(core, method)(*args), None
    except Exception as exc:  # noqa: BLE001 - reported to the caller
        return None, [isinstance(exc, ValueError), str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"]
