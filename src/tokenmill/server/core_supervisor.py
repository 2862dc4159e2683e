"""Engine-core supervision: a dead core is restarted with backoff instead of leaving the server answering
503 forever (vLLM shuts the whole server down here). Past the restart budget the server exits 1, so an
orchestrator (systemd, Kubernetes) restarts the whole process.

What the dead core owned goes with its AsyncLLM, which is shut down and replaced, never reused: requests
in flight already failed with EngineDeadError (a 503 in OpenAI's error shape, or an error event on a
stream), shutdown() reaps the process and closes its ZeroMQ sockets and socket directory, and the KV
cache lived in the dead process. The server side resets what mirrored the core: the engine gauges and
the baselines of the cumulative counters. Until the new core reports ready, /health and every model
endpoint answer 503 with Retry-After (the old engine stays in `state.engine`, errored).

The budget is a sliding window: at most `max_core_restarts` restarts within `core_restart_window_s`
(default 3 in 10 minutes). A core that crashes now and then over days keeps being restarted; one that
crashes at once after every start (a bad model file, a broken machine) ends the server within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tokenmill.config import ServerConfig
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.server")


class RestartBudget:
    """Restart times inside a sliding window. Invariant: after `next_delay(now)`, `times` holds only
    restarts newer than `now - window_s`, oldest first."""

    def __init__(self, config: ServerConfig) -> None:
        self.max_restarts = config.max_core_restarts
        self.window_s = config.core_restart_window_s
        self.backoff_s = config.core_restart_backoff_s
        self.max_backoff_s = config.core_restart_max_backoff_s
        self.times: deque[float] = deque()

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next restart (doubling with each restart still in the window), or
        None when `max_restarts` restarts already happened within the window."""
        while self.times and self.times[0] <= now - self.window_s:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return None
        return min(self.backoff_s * 2 ** len(self.times), self.max_backoff_s)

    def record(self, now: float) -> None:
        self.times.append(now)


EngineFactory = Callable[[Any], Awaitable[Any]]


async def supervise(state: ServerState, factory: EngineFactory) -> None:
    """Watch `state.engine`; on its death restart it, or give up and ask the server to exit (on_fatal).
    Returns when the server drains, when the budget is spent, or when the engine cannot be watched."""
    try:
        await _watch(state, factory, RestartBudget(state.server_config))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug here must not leave the server up answering 503 forever
        log.exception("engine core supervisor failed")
        _exit(state, f"engine core supervisor failed: {type(exc).__name__}: {exc}")


async def _watch(state: ServerState, factory: EngineFactory, budget: RestartBudget) -> None:
    while True:
        engine = state.engine
        wait_dead = getattr(engine, "wait_dead", None)
        if wait_dead is None:  # an engine without the protocol (a test double): nothing to supervise
            return
        reason = await wait_dead()
        if state.draining:
            return
        await engine.shutdown()  # reap the process, close its sockets; its requests have already failed
        state.metrics.engine_restarted()
        new = await _restart(state, factory, budget, reason)
        if new is None:
            return
        state.engine = new


async def _restart(state: ServerState, factory: EngineFactory, budget: RestartBudget, reason: str) -> Any:
    """A new engine, after the backoff; retried (within the budget) while starting it fails. None: give up."""
    while True:
        delay = budget.next_delay(time.monotonic())
        if delay is None:
            _give_up(state, budget, reason)
            return None
        log.error("engine core died (%s); restart %d of at most %d within %.0fs, in %.1fs", reason,
                  len(budget.times) + 1, budget.max_restarts, budget.window_s, delay)
        await asyncio.sleep(delay)
        budget.record(time.monotonic())
        t0 = time.monotonic()
        try:
            engine = await factory(state.engine_config)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - counts against the budget like a death
            reason = f"restart failed: {type(exc).__name__}: {exc}"
            continue
        state.core_restarts += 1
        state.metrics.observe_core_restart()
        log.warning("engine core restarted in %.1fs (pid %s); serving again", time.monotonic() - t0,
                    engine.model_info.extra.get("pid"))
        return engine


def _give_up(state: ServerState, budget: RestartBudget, reason: str) -> None:
    _exit(state, f"engine core died ({reason}) after {len(budget.times)} restarts within {budget.window_s:.0f}s "
                 f"(--max-core-restarts {budget.max_restarts}); the server exits")


def _exit(state: ServerState, reason: str) -> None:
    state.load_error = reason
    log.error("%s", reason)
    on_fatal = state.extra.get("on_fatal")
    if on_fatal is not None:
        on_fatal()
