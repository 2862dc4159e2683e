"""EngineCore: the step loop schedule -> runner.execute -> update. Owns all scheduler state.

The runner is injected (anything with `execute(SchedulerOutput) -> ModelOutput`, `kv_cache_groups`,
`num_blocks`, `block_size` and `loaded.max_model_len`), so this module never imports torch.
Not thread-safe: one thread calls add_request/abort/step (clients queue their calls in between steps).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.outputs import (
    KVCacheGroupSpec,
    ModelOutput,
    SchedulerOutput,
    SeqOutputDelta,
)
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.stats import SchedulerStats
from tokenmill.structured_output.manager import StructuredOutputManager

log = logging.getLogger(__name__)


# With only grammars compiling, a step blocks this long for one to finish (short: new requests and aborts
# are read between steps).
_GRAMMAR_IDLE_WAIT_S = 0.005


def _structured_output_manager(config: EngineConfig, loaded: Any) -> StructuredOutputManager | None:
    """The model's grammar backend (xgrammar loads on the first constrained request), or None without a
    tokenizer. The mask spans the LM head's width, which can exceed the tokenizer (Gemma: 262,144)."""
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        return None
    model_cfg = getattr(getattr(loaded, "model", None), "config", None)
    width = int(getattr(model_cfg, "vocab_size", 0) or loaded.vocab_size)
    return StructuredOutputManager(tokenizer, width, list(getattr(loaded, "eos_token_ids", []) or []),
                                   compile_timeout_s=config.scheduler.grammar_compile_timeout_s,
                                   compile_threads=config.scheduler.grammar_compile_threads)


class Runner(Protocol):
    kv_cache_groups: list[KVCacheGroupSpec]
    num_blocks: list[int]
    block_size: int
    loaded: Any

    def execute(self, sched: SchedulerOutput) -> ModelOutput: ...


class EngineCore:
    def __init__(self, config: EngineConfig, runner: Runner) -> None:
        self.config = config
        self.runner = runner
        loaded = runner.loaded
        self.max_model_len = int(loaded.max_model_len)
        cache = config.cache
        if runner.block_size != cache.block_size:
            # The runner's tensors decide; keep the scheduler's arithmetic in step with them.
            from dataclasses import replace
            cache = replace(cache, block_size=runner.block_size)
        self.scheduler = Scheduler(config.scheduler, cache, runner.kv_cache_groups, runner.num_blocks,
                                   self.max_model_len, getattr(loaded, "vocab_size", None),
                                   structured=_structured_output_manager(config, loaded), lora=config.lora)
        self._stale_finished: list[str] = []

    def add_request(self, req: EngineCoreRequest) -> None:
        if not req.eos_token_ids:
            req.eos_token_ids = list(getattr(self.runner.loaded, "eos_token_ids", []) or [])
        self.scheduler.add_request(req)

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.abort(request_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[SeqOutputDelta]:
        sched = self.scheduler.schedule()
        if self._stale_finished:
            sched.finished_seq_ids = self._stale_finished + sched.finished_seq_ids
            self._stale_finished = []
        if not sched.seqs:
            if sched.finished_seq_ids:  # nothing to run: the runner still drops their state (draft KV) now
                try:
                    self.runner.execute(sched)
                except Exception:
                    log.exception("runner failed dropping the state of finished sequences")
                    self._stale_finished = sched.finished_seq_ids
            self.scheduler.wait_for_grammars(_GRAMMAR_IDLE_WAIT_S)
            return self.scheduler.update(sched, ModelOutput(sampled=[]))
        try:
            out = self.runner.execute(sched)
        except Exception as e:  # a failing batch fails its sequences, not the engine
            log.exception("runner failed on a batch of %d sequences", len(sched.seqs))
            # it may have raised before dropping the finished sequences' state: hand them over again
            self._stale_finished = sched.finished_seq_ids
            self.scheduler.fail_seqs([s.seq_id for s in sched.seqs], f"model runner error: {e!r}")
            return self.scheduler.update(SchedulerOutput(seqs=[]), ModelOutput(sampled=[]))
        return self.scheduler.update(sched, out)

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        lora = getattr(self.runner, "lora", None)  # the runner's LoRAManager: slots and the in-memory cache
        if lora is not None:
            counts = lora.stats()
            stats.lora_num_swaps, stats.lora_num_loaded = int(counts["swaps"]), int(counts["loaded"])
        return stats

    def add_lora(self, lora_request: dict[str, Any]) -> None:
        """Validate an adapter against the model and keep it in memory (the load endpoint); ValueError
        (lora.adapter.LoRAAdapterError) names the file and the problem."""
        from tokenmill.lora.request import LoRARequest

        manager = self._lora_manager()
        try:
            manager.add(LoRARequest.from_wire(lora_request))
        except OSError as exc:  # a path the OS refuses (name too long, unreadable...): the caller's input
            raise ValueError(f"{exc.filename or lora_request.get('lora_path')}: cannot be read "
                             f"({exc.strerror or exc}); lora_path must be a readable PEFT adapter folder") from None

    def remove_lora(self, lora_name: str) -> bool:
        """Drop an adapter from memory (True if it was held). While requests through it are unfinished it
        stays (their steps need its weights): the in-memory LRU evicts it once they are done."""
        manager = self._lora_manager()
        if any(s.lora is not None and s.lora.get("lora_name") == lora_name for s in self.scheduler.seqs.values()):
            return False
        return bool(manager.remove(lora_name))

    def _lora_manager(self) -> Any:
        lora = getattr(self.runner, "lora", None)
        if lora is None:
            raise ValueError("invalid lora_request: LoRA is not enabled on this engine (--enable-lora)")
        return lora

    def kv_capacity_tokens(self) -> int:
        return self.scheduler.kv.capacity_tokens()

    def all_blocks_free(self) -> bool:
        return self.scheduler.kv.all_free()
