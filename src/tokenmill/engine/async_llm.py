"""AsyncLLM: the async engine the HTTP server uses. Tokenization, detokenization and stop strings run here
(front end); the core sits behind a CoreClient (in-process thread, or core_client.MPCoreClient over ZeroMQ).

generate() yields RequestOutput DELTAS: each CompletionOutput carries only what is new since the last yield,
and its finish_reason on the last one. One output-handler task reads the core's batches and routes them to
per-request queues; a request that fails raises in its own generate() only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.args import normalize_prompt
from tokenmill.engine.errors import EngineDeadError, RequestError
from tokenmill.engine.inproc_client import CoreClient, InProcessCoreClient
from tokenmill.engine.output_processor import RequestState
from tokenmill.engine.outputs import RequestOutput, SeqOutputDelta
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.stats import SchedulerStats, log_stats_forever
from tokenmill.lora.request import LoRARequest
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the front end knows about the served model (built from the core client's handshake dict)."""

    name: str = "default"
    max_model_len: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    chat_template: str | None = None
    task: str = "generate"
    vocab_size: int = 0
    kv_capacity_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the client reported

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})


class AsyncLLM:
    def __init__(self, config: EngineConfig, client: CoreClient | None = None) -> None:
        self.config = config
        self.client: CoreClient = client if client is not None else InProcessCoreClient(config)
        self._queues: dict[str, asyncio.Queue[list[SeqOutputDelta] | BaseException]] = {}
        self._num_samples: dict[str, int] = {}
        self._handler: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None  # periodic stats line (config.log_stats_interval_s)
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._info: ModelInfo | None = None
        self._info_src: Any = None

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        info = self.client.model_info
        if self._info is None or self._info_src is not info:
            self._info, self._info_src = ModelInfo.from_dict(dict(info)), info
        return self._info

    @property
    def errored(self) -> bool:
        return self._dead is not None or bool(self.client.errored)

    @property
    def dead_reason(self) -> str | None:
        """Why the engine stopped (None while it runs)."""
        if not self.errored:
            return None
        return getattr(self.client, "dead_reason", None) or (str(self._dead) if self._dead else None)

    async def wait_dead(self) -> str:
        """Block until the engine core is gone (died, failed or shut down) and return why. Every request
        in flight has then failed with EngineDeadError; a new engine is needed to serve again."""
        return await self.client.wait_dead()

    def stats(self) -> SchedulerStats:
        return self.client.stats()

    def _ensure_handler(self) -> None:
        if self._handler is None or self._handler.done():
            self._handler = asyncio.get_running_loop().create_task(self._output_loop())
        interval = self.config.log_stats_interval_s
        if interval and self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(
                log_stats_forever(self.stats, interval, logging.getLogger("tokenmill.engine.stats")))

    async def _output_loop(self) -> None:
        while True:
            try:
                batch = await self.client.get_output()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - core gone: every waiter learns it
                # keep the client's own exception (its class may be what the caller catches)
                self._dead = e if isinstance(e, Exception) else EngineDeadError(str(e))
                for q in self._queues.values():
                    q.put_nowait(self._dead)
                return
            by_req: dict[str, list[SeqOutputDelta]] = {}
            for d in batch:
                by_req.setdefault(d.request_id, []).append(d)
            for rid, ds in by_req.items():
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(ds)

    async def generate(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutput deltas until every sample of the request has finished (through the LoRA
        adapter `lora_request`, or the base model).
        Raises ValueError for invalid input, RequestError if the engine failed this request,
        EngineDeadError if the core died."""
        if self.errored:
            raise self._dead or EngineDeadError(getattr(self.client, "dead_reason", None) or "engine is not running")
        params = params or SamplingParams()
        params.validate()
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"invalid request_id={rid!r}: already in use")
        text, ids = normalize_prompt(prompt, self.tokenizer)
        info = self.model_info
        max_len = info.max_model_len
        if max_len and len(ids) > max_len:
            raise ValueError(f"invalid prompt: it has {len(ids)} tokens, more than max_model_len={max_len}")
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and len(ids) > sched.max_num_batched_tokens:
            raise ValueError(f"invalid prompt: it has {len(ids)} tokens, more than max_num_batched_tokens="
                             f"{sched.max_num_batched_tokens} while chunked prefill is disabled")
        vocab = info.vocab_size
        if vocab and any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"invalid prompt_token_ids: ids must be in [0, {vocab})")
        state = RequestState(rid, text, ids, params, self.tokenizer)
        q: asyncio.Queue[list[SeqOutputDelta] | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        self._num_samples[rid] = params.n
        self._ensure_handler()
        finished = False
        try:
            await self.client.add_request(EngineCoreRequest(
                rid, ids, params, priority=priority, eos_token_ids=list(info.eos_token_ids),
                lora_request=lora_request.to_wire() if lora_request is not None else None))
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                while not q.empty():  # coalesce what piled up while the consumer was busy
                    more = q.get_nowait()
                    if isinstance(more, BaseException):
                        raise more
                    item = item + more
                outs, aborts = [], []
                for d in item:
                    co, abort = state.process(d)
                    if abort:
                        aborts.append(abort)
                    if co is not None:
                        outs.append(co)
                if aborts:
                    await self.client.abort(aborts)
                finished = state.finished
                errs = state.errors()
                if errs:  # the finally clause aborts any sibling samples still running
                    raise RequestError(errs[0])
                if outs:
                    yield RequestOutput(request_id=rid, prompt=text, prompt_token_ids=ids,
                                        outputs=_merge(outs), finished=finished,
                                        num_cached_tokens=state.num_cached_tokens,
                                        prompt_logprobs=state.take_prompt_logprobs())
        finally:
            self._queues.pop(rid, None)
            self._num_samples.pop(rid, None)
            release = getattr(self.client, "release", None)  # per-request bookkeeping in the client, if any
            if release is not None:
                release(rid)
            if not finished and not self.errored:
                # cancelled, consumer stopped early, or failed: free the request's blocks in the core
                await asyncio.shield(self.client.abort([rid]))

    async def abort(self, request_id: str) -> None:
        """Abort a request: the core frees its blocks within one step; its generate() ends with 'abort'."""
        await self.client.abort([request_id])
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait([SeqOutputDelta(request_id=request_id, index=i, new_token_ids=[], finish_reason="abort")
                          for i in range(self._num_samples.get(request_id, 1))])

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Validate the adapter against the model and load it into the core's memory now; ValueError
        (naming the file and the problem) when it cannot be served."""
        await self.client.call_utility("add_lora", lora_request.to_wire())

    async def remove_lora(self, lora_name: str) -> None:
        await self.client.call_utility("remove_lora", lora_name)

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        if not inputs:
            raise ValueError("invalid input: at least one text or token list is required")
        batch = [normalize_prompt(x, self.tokenizer)[1] for x in inputs]
        return await self.client.embed(batch)

    async def shutdown(self) -> None:
        for task in (self._handler, self._stats_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.client.shutdown()


def _merge(outs: list) -> list:
    """Coalesced deltas of the same sample become one CompletionOutput (text and tokens concatenated)."""
    merged: dict[int, Any] = {}
    for co in outs:
        cur = merged.get(co.index)
        if cur is None:
            merged[co.index] = co
            continue
        cur.text += co.text
        cur.token_ids += co.token_ids
        if co.logprobs is not None:
            cur.logprobs = (cur.logprobs or []) + co.logprobs
        cur.cumulative_logprob = co.cumulative_logprob
        cur.finish_reason, cur.stop_reason = co.finish_reason, co.stop_reason
    return [merged[i] for i in sorted(merged)]
