"""Async client for an engine core running in its own process (see core_proc for the wire format).

The core is spawned (not forked: torch and threads do not survive fork) and talks over two ipc://
PUSH/PULL sockets. A reader task turns core messages into output batches; the process sentinel is
watched by the event loop, so a dead core is noticed at once: `errored` turns True, every waiter
gets EngineDeadError instead of hanging, and `wait_dead()` returns the reason (the server's supervisor
then shuts this client down and starts a new one: a client serves one core process for its whole life).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
from typing import Any

import zmq
import zmq.asyncio

from tokenmill.config import EngineConfig
from tokenmill.engine.core_proc import (
    delta_from_row,
    pack,
    run_core,
    stats_from_wire,
    unpack,
)
from tokenmill.engine.errors import EngineDeadError, UtilityError
from tokenmill.engine.outputs import SeqOutputDelta
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.stats import SchedulerStats

log = logging.getLogger("tokenmill.engine.client")


_IPC_PREFIX = "tokenmill-core-"


def make_ipc_dir() -> str:
    """A fresh folder for this process's core sockets, named after its PID. A process that never reached
    shutdown (SIGKILL, OOM) leaves its folder behind; each new one removes those of PIDs no longer running."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(_IPC_PREFIX):].split("-", 1)[0]
        if name.startswith(_IPC_PREFIX) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_IPC_PREFIX}{os.getpid()}-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe_exit(exitcode: int | None) -> str:
    """'killed by signal SIGKILL' / 'exit code 3': why a process ended, for logs and error messages."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class MPCoreClient:
    """Invariants: after `start()` returns, `model_info` and `tokenizer` are set; once `errored` is True
    it stays True and `get_output()` raises EngineDeadError. `_first_scheduled` only holds entries of
    requests in `_live` (added and not yet released), so it cannot outgrow the requests in flight."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_info: dict[str, Any] = {}
        self.tokenizer: Any = None
        self.errored = False
        self.dead_reason: str | None = None
        self._stats = SchedulerStats()
        self._first_scheduled: dict[str, float] = {}  # request_id -> wall time, until the server takes it
        self._live: set[str] = set()  # requests added and not yet released (see release())
        self._dead = asyncio.Event()
        self._outputs: asyncio.Queue[list[SeqOutputDelta] | None] = asyncio.Queue()
        self._embed_calls: dict[int, asyncio.Future[list[list[float]]]] = {}
        self._utility_calls: dict[int, asyncio.Future[Any]] = {}
        self._next_call = 0
        self._dir = make_ipc_dir()
        self._ctx = zmq.asyncio.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._from_core = self._ctx.socket(zmq.PULL)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig) -> MPCoreClient:
        client = cls(config)
        try:
            await client._start()
        except BaseException:
            await client.shutdown()
            raise
        return client

    async def _start(self) -> None:
        in_addr = f"ipc://{self._dir}/in"
        out_addr = f"ipc://{self._dir}/out"
        self._to_core.setsockopt(zmq.LINGER, 0)
        self._to_core.bind(in_addr)
        self._from_core.bind(out_addr)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(target=run_core, args=(self.config, in_addr, out_addr, os.getpid()),
                                 name="tokenmill-engine-core", daemon=True)
        self._proc.start()
        loop.add_reader(self._proc.sentinel, self._on_exit)
        self._reader = asyncio.create_task(self._read_loop())
        await self._ready

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        self._proc.join(timeout=1)  # reap it, so the exit code is known and no zombie is left
        code = self._proc.exitcode
        if not self._closed:
            self._mark_dead(self.dead_reason or f"engine core process {self._proc.pid} died ({describe_exit(code)})")

    def _mark_dead(self, reason: str) -> None:
        if self.errored:
            return
        self.errored = True
        self.dead_reason = reason
        if not self._closed:
            log.error("engine core dead: %s", reason)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineDeadError(reason))
        for fut in [*self._embed_calls.values(), *self._utility_calls.values()]:
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        self._embed_calls.clear()
        self._utility_calls.clear()
        self._first_scheduled.clear()
        self._live.clear()
        self._outputs.put_nowait(None)  # wakes the consumer, which raises
        self._dead.set()

    async def wait_dead(self) -> str:
        """Block until the core is gone (died, failed, or shut down); returns why."""
        await self._dead.wait()
        return self.dead_reason or "engine core is not running"

    async def shutdown(self) -> None:
        """Ask the core to exit, then make sure it has (terminate, then kill); no child is left behind."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            try:  # NOBLOCK: a core that already closed its socket leaves PUSH with no peer, and send would block forever
                await self._to_core.send(pack(["shutdown"]), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            for step in ("wait", "kill"):  # the core ignores SIGTERM (see core_proc.run_core)
                if step == "kill":
                    proc.kill()
                for _ in range(50):
                    if not proc.is_alive():
                        break
                    await asyncio.sleep(0.05)
                if not proc.is_alive():
                    break
        if proc is not None:
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
            proc.join(timeout=1)
        self._mark_dead("engine shut down")
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._to_core.close(0)
        self._from_core.close(0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- requests -------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.errored:
            raise EngineDeadError(self.dead_reason or "engine core is not running")

    async def add_request(self, req: EngineCoreRequest) -> None:
        self._check()
        self._live.add(req.request_id)
        await self._send(["add", req.to_wire()])

    async def abort(self, request_ids: list[str]) -> None:
        if self.errored or not request_ids:
            return
        try:
            await self._send(["abort", list(request_ids)])
        except EngineDeadError:
            pass  # nothing left to abort

    async def _send(self, msg: list[Any]) -> None:
        """Send to the core, or raise EngineDeadError once it is gone: a PUSH socket whose peer died
        blocks a send forever, so the send is raced against the death."""
        self._check()
        sending = asyncio.ensure_future(self._to_core.send(pack(msg)))
        if not sending.done():  # usually done at once (queued below the high-water mark)
            dead = asyncio.ensure_future(self._dead.wait())
            try:
                await asyncio.wait({sending, dead}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                dead.cancel()
                if not sending.done():  # the core died first, or the caller was cancelled
                    sending.cancel()
            self._check()
        sending.result()

    def release(self, request_id: str) -> None:
        """The front end is done with this request (finished, aborted or failed). Its first-scheduled time
        is dropped, and one the core reports later (it scheduled the request in the step the abort crossed)
        is ignored instead of kept forever."""
        self._live.discard(request_id)
        self._first_scheduled.pop(request_id, None)

    async def get_output(self) -> list[SeqOutputDelta]:
        """The next batch of deltas (one engine step); raises EngineDeadError once the core is gone."""
        if self.errored and self._outputs.empty():
            raise EngineDeadError(self.dead_reason or "engine core is not running")
        batch = await self._outputs.get()
        if batch is None:
            self._outputs.put_nowait(None)  # every later caller must see it too
            raise EngineDeadError(self.dead_reason or "engine core is not running")
        return batch

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        self._check()
        call = self._next_call
        self._next_call += 1
        fut: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._embed_calls[call] = fut
        await self._send(["embed", call, batch])
        return await fut

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Run EngineCore.<method>(*args) in the core between steps (core_proc.UTILITY_METHODS); its
        ValueError comes back as ValueError, anything else as UtilityError."""
        self._check()
        call = self._next_call
        self._next_call += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._utility_calls[call] = fut
        await self._send(["utility", call, method, list(args)])
        return await fut

    def stats(self) -> SchedulerStats:
        return self._stats

    def pop_first_scheduled(self, request_id: str) -> float | None:
        """Wall-clock time (time.time()) the core first scheduled this request, once it has."""
        return self._first_scheduled.pop(request_id, None)

    # ---- reader ---------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            self._on_message(unpack(await self._from_core.recv()))

    def _on_message(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "out":
            self._stats = stats_from_wire(msg[2])
            # before the deltas: a request's first token is never seen before its scheduled time
            self._first_scheduled.update((rid, t) for rid, t in msg[3].items() if rid in self._live)
            if msg[1]:
                self._outputs.put_nowait([delta_from_row(r) for r in msg[1]])
        elif kind == "stats":
            self._stats = stats_from_wire(msg[1])
        elif kind == "embed":
            fut = self._embed_calls.pop(msg[1], None)
            if fut is not None and not fut.done():
                if msg[3] is not None:
                    fut.set_exception(ValueError(msg[3]))
                else:
                    fut.set_result(msg[2])
        elif kind == "utility":
            fut = self._utility_calls.pop(msg[1], None)
            if fut is not None and not fut.done():
                if msg[3] is not None:
                    fut.set_exception(ValueError(msg[3][1]) if msg[3][0] else UtilityError(msg[3][1]))
                else:
                    fut.set_result(msg[2])
        elif kind == "ready":
            self.model_info = msg[1]
            self.tokenizer = pickle.loads(msg[2])
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "fatal":
            self.dead_reason = f"engine core failed: {msg[1]}"
            self._mark_dead(self.dead_reason)
