"""In-process core client: the EngineCore steps in a background thread of this process.

Same protocol as the ZeroMQ client (core_client.MPCoreClient): add_request / abort / get_output / embed /
stats / shutdown, plus model_info, tokenizer and errored. Calls from the event loop are queued and applied
by the core thread between steps, so the core itself stays single-threaded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from typing import Any, Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.core_proc import call_utility
from tokenmill.engine.errors import EngineDeadError, UtilityError
from tokenmill.engine.outputs import SeqOutputDelta
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.stats import SchedulerStats

log = logging.getLogger(__name__)


class CoreClient(Protocol):
    model_info: dict[str, Any]
    tokenizer: Any
    errored: bool

    async def add_request(self, req: EngineCoreRequest) -> None: ...
    async def abort(self, request_ids: list[str]) -> None: ...
    async def get_output(self) -> list[SeqOutputDelta]: ...
    async def embed(self, batch: list[list[int]]) -> list[list[float]]: ...
    async def call_utility(self, method: str, *args: Any) -> Any: ...
    def stats(self) -> SchedulerStats: ...
    async def shutdown(self) -> None: ...
    async def wait_dead(self) -> str: ...


def model_info_of(config: EngineConfig, runner: Any, core: EngineCore | None) -> dict[str, Any]:
    loaded = runner.loaded
    return {
        "name": config.model.served_model_name or config.model.model or "default",
        "max_model_len": int(loaded.max_model_len),
        "eos_token_ids": list(loaded.eos_token_ids),
        "bos_token_id": loaded.bos_token_id,
        "chat_template": loaded.chat_template,
        "task": loaded.task,
        "vocab_size": int(loaded.vocab_size),
        "kv_capacity_tokens": core.kv_capacity_tokens() if core is not None else 0,
        "block_size": int(runner.block_size),
        "num_blocks": [int(b) for b in runner.num_blocks],
        "kv_cache_bytes": int(getattr(runner, "kv_cache_bytes", 0)),
        **runner.precision_info(),
    }


class InProcessCoreClient:
    """Invariants: only the core thread touches the EngineCore; once `errored` it stays errored."""

    def __init__(self, config: EngineConfig, runner: Any | None = None) -> None:
        if runner is None:
            from tokenmill.executor.model_runner import ModelRunner

            runner = ModelRunner(config)
        self.runner = runner
        self.core = EngineCore(config, runner) if runner.loaded.task == "generate" else None
        self.model_info = model_info_of(config, runner, self.core)
        self.tokenizer = runner.loaded.tokenizer
        self.errored = False
        self.dead_reason: str | None = None
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue[list[SeqOutputDelta] | None] | None = None
        self._stats = self.core.stats() if self.core else SchedulerStats()
        self._stop = threading.Event()
        self._dead = asyncio.Event()  # set on the event loop once errored (see wait_dead)
        self._thread: threading.Thread | None = None

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._outputs = asyncio.Queue()
            self._thread = threading.Thread(target=self._run, name="tokenmill-core", daemon=True)
            self._thread.start()

    # ---- core thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.core is not None and self.core.has_unfinished()
                try:
                    item = self._inbox.get_nowait() if busy else self._inbox.get(timeout=0.5)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._handle(*item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self._stop.is_set():
                    break
                if self.core is not None and self.core.has_unfinished():
                    deltas = self.core.step()
                    self._stats = self.core.stats()
                    if deltas:
                        self._post(deltas)
                elif self.core is not None:
                    self._stats = self.core.stats()
        except Exception as e:  # noqa: BLE001 - the front end must learn why the core is gone
            log.error("engine core thread failed: %s", traceback.format_exc())
            self.dead_reason = f"engine core failed: {type(e).__name__}: {e}"
            self.errored = True
            self._post(None)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._dead.set)

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            req, fut = arg
            try:
                if self.core is None:
                    raise ValueError("invalid request: this model serves embeddings only (task=embed)")
                self.core.add_request(req)
                self._resolve(fut, None, None)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._resolve(fut, None, e)
        elif kind == "abort":
            if self.core is not None:
                self.core.abort(arg)
        elif kind == "embed":
            batch, fut = arg
            try:
                self._resolve(fut, self.runner.embed(batch), None)
            except Exception as e:  # noqa: BLE001
                self._resolve(fut, None, e)
        elif kind == "utility":
            method, args, fut = arg
            result, err = call_utility(self.core, method, args)
            self._resolve(fut, result, None if err is None else ValueError(err[1]) if err[0] else UtilityError(err[1]))
        elif kind == "wake":
            pass

    def _resolve(self, fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
        def done() -> None:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(value)
        self._loop.call_soon_threadsafe(done)

    def _post(self, item: list[SeqOutputDelta] | None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)

    # ---- protocol -----------------------------------------------------------------------------
    def _check(self) -> None:
        if self.errored:
            raise EngineDeadError(self.dead_reason or "engine core is not running")

    async def add_request(self, req: EngineCoreRequest) -> None:
        self._check()
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("add", (req, fut)))
        await fut

    async def abort(self, request_ids: list[str]) -> None:
        if not self.errored and request_ids and self._thread is not None:
            self._inbox.put(("abort", list(request_ids)))

    async def get_output(self) -> list[SeqOutputDelta]:
        self._ensure_started()
        batch = await self._outputs.get()
        if batch is None:
            self._outputs.put_nowait(None)  # every later caller sees it too
            raise EngineDeadError(self.dead_reason or "engine core is not running")
        return batch

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        self._check()
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("embed", (batch, fut)))
        return await fut

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Run EngineCore.<method>(*args) on the core thread between steps (see MPCoreClient.call_utility)."""
        self._check()
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("utility", (method, list(args), fut)))
        return await fut

    def stats(self) -> SchedulerStats:
        return self._stats

    async def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        if not self.errored:
            self.errored = True
            self.dead_reason = "engine shut down"
            self._post(None)
        self._dead.set()

    async def wait_dead(self) -> str:
        """Block until the core thread has failed or been shut down; returns why."""
        await self._dead.wait()
        return self.dead_reason or "engine core is not running"
