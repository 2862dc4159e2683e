"""The scheduler's side of multi-LoRA: at most max_loras distinct adapters among running sequences (the
runner holds that many slots of stacked weights), and the per-adapter counts the metrics report.

A waiting sequence whose adapter would be one too many is skipped, not queued behind: base-model requests
and requests for adapters already running go ahead of it, and it is admitted once a running adapter's last
sequence finishes (the runner then swaps the new adapter into the freed slot).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenmill.config import LoRAConfig
from tokenmill.engine.request import EngineCoreRequest, Sequence


class LoRASlots:
    """Invariant (kept by the scheduler calling admits() before admitting): the running sequences use at
    most max_loras distinct nonzero lora_ids. requests_by_name counts admitted requests per adapter name."""

    def __init__(self, config: LoRAConfig | None) -> None:
        self.config = config
        self.requests_by_name: Counter[str] = Counter()

    @property
    def max_loras(self) -> int:
        return self.config.max_loras if self.config is not None else 0

    def check(self, req: EngineCoreRequest) -> None:
        """ValueError for a request naming an adapter this engine cannot serve; else count it."""
        lora = req.lora_request
        if lora is None:
            return
        if self.config is None:
            raise ValueError(f"invalid lora_request: adapter {lora.get('lora_name')!r} asked for, but LoRA is not "
                             "enabled on this engine (start it with enable_lora=True / --enable-lora)")
        lora_id = lora.get("lora_int_id")
        if not isinstance(lora_id, int) or isinstance(lora_id, bool) or lora_id < 1:
            raise ValueError(f"invalid lora_request.lora_int_id={lora_id!r}: must be an integer >= 1")
        self.requests_by_name[str(lora.get("lora_name"))] += 1

    def admits(self, seq: Sequence, running: Iterable[Sequence]) -> bool:
        """True when seq can run next to `running` without more than max_loras distinct adapters."""
        if seq.lora_id == 0:
            return True
        active = {s.lora_id for s in running if s.lora_id}
        return seq.lora_id in active or len(active) < self.max_loras

    def stats(self, running: Iterable[Sequence], waiting: Iterable[Sequence]) -> dict[str, object]:
        """The LoRA fields of SchedulerStats."""
        return {"lora_running": self.names(running), "lora_waiting": self.names(waiting),
                "lora_requests": dict(self.requests_by_name)}

    @staticmethod
    def names(seqs: Iterable[Sequence]) -> list[str]:
        """Distinct adapter names of these sequences, sorted (vLLM's running/waiting_lora_adapters)."""
        return sorted({str(s.lora["lora_name"]) for s in seqs if s.lora})
