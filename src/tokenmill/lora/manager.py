"""LoRAManager: the runner's adapters. max_loras slots in the stacked weights of every wrapped layer,
max_cpu_loras parsed adapters kept in memory (LRU), loaded from disk on first use; per step it assigns the
step's adapters to slots and routes each token to its slot (lora/layers.py)."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tokenmill.config import LoRAConfig
from tokenmill.engine.outputs import ScheduledSeq
from tokenmill.layers.linear import FusedLinear
from tokenmill.lora.adapter import BaseShapes, LoRAAdapter, TargetShape, load_adapter
from tokenmill.lora.layers import LoRABatch, LoRALinear, Shard
from tokenmill.lora.request import LoRARequest

log = logging.getLogger("tokenmill.lora")

# Our (fused) module -> the HF projections it holds, by shard name.
_FUSED_TARGETS = {"qkv_proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
                  "gate_up_proj": {"gate": "gate_proj", "up": "up_proj"}}
_PLAIN_TARGETS = ("o_proj", "down_proj")
_WRAPPABLE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(qkv_proj|gate_up_proj|o_proj|down_proj)$")


class LoRAManager:
    """Invariants: slot_ids[s] is the lora_int_id whose weights fill slot s of every layer (None: free);
    `cache` holds at most max_cpu_loras parsed adapters, least recently used first."""

    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device):
        self.config = config
        self.max_loras = config.max_loras
        self.max_cpu_loras = config.max_cpu_loras or config.max_loras
        if self.max_loras < 1 or config.max_lora_rank < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError(f"invalid LoRA config: max_loras={self.max_loras} and max_lora_rank="
                             f"{config.max_lora_rank} must be >= 1, max_cpu_loras={self.max_cpu_loras} >= max_loras")
        # CPU: float32 (bf16 matmuls are emulated and slow on CPUs without native bf16; the weights are small).
        self.dtype = torch.float32 if device.type == "cpu" else next(model.parameters()).dtype
        self.device = device
        self.batch = LoRABatch()
        self.layers: dict[int, list[LoRALinear]] = {}
        self.shapes = self._wrap(model)
        self.requests: dict[int, LoRARequest] = {}
        self.cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slot_ids: list[int | None] = [None] * self.max_loras
        self.slot_last_use: list[int] = [0] * self.max_loras
        self.num_loads = 0
        self.num_swaps = 0
        self._step = 0

    def _wrap(self, model: nn.Module) -> BaseShapes:
        """Replace each decoder projection's forward with a LoRALinear around it; returns the base shapes."""
        targets: dict[str, TargetShape] = {}
        for name, module in model.named_modules():
            m = _WRAPPABLE.search(name)
            if m is None or not isinstance(module, nn.Linear):
                continue
            layer, kind = int(m.group(1)), m.group(2)
            if isinstance(module, FusedLinear):
                names = _FUSED_TARGETS[kind]
                shards = [Shard(names[s], off, size) for s, (off, size) in module.shard_offsets.items()]
            else:
                shards = [Shard(kind, 0, module.out_features)]
            for s in shards:
                targets[s.target] = TargetShape(module.in_features, s.size)
            wrapped = LoRALinear(module.forward, shards, module.in_features, module.out_features, self.max_loras,
                                 self.config.max_lora_rank, self.batch, self.dtype, self.device)
            module.forward = wrapped  # instance attribute: module(x) now calls the wrapper
            self.layers.setdefault(layer, []).append(wrapped)
        if not self.layers:
            raise ValueError(f"LoRA: {type(model).__name__} has no decoder projections to adapt")
        return BaseShapes(max(self.layers) + 1, targets)

    # ---- adapters in memory -----------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> LoRAAdapter:
        """Validate and load an adapter into the CPU cache now (LoRAAdapterError if malformed: nothing is
        registered then); a request whose id is known with another path replaces it."""
        old = self.requests.get(request.lora_int_id)
        if old == request and request.lora_int_id in self.cache:
            return self._adapter(request.lora_int_id)
        adapter = self._load(request)
        if old is not None and old.lora_path != request.lora_path:
            self._forget(request.lora_int_id)
        self.requests[request.lora_int_id] = request
        self._cache_put(request.lora_int_id, adapter)
        return adapter

    def remove(self, lora: str | int) -> bool:
        """Forget an adapter by name or id (cache and slot); False if it is unknown."""
        ids = [i for i, r in self.requests.items() if lora in (r.lora_name, r.lora_int_id)]
        for i in ids:
            self._forget(i)
            del self.requests[i]
        return bool(ids)

    def _forget(self, lora_id: int) -> None:
        self.cache.pop(lora_id, None)
        if lora_id in self.slot_ids:
            self.slot_ids[self.slot_ids.index(lora_id)] = None  # stale weights stay: no token routes there

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.cache.get(lora_id)
        if adapter is not None:
            self.cache.move_to_end(lora_id)
            return adapter
        request = self.requests.get(lora_id)
        if request is None:
            raise KeyError(f"lora_int_id={lora_id} has no registered adapter (its setup carried no lora_request)")
        adapter = self._load(request)
        self._cache_put(lora_id, adapter)
        return adapter

    def _load(self, request: LoRARequest) -> LoRAAdapter:
        adapter = load_adapter(request.lora_path, self.config.max_lora_rank, self.shapes, self.dtype)
        self.num_loads += 1
        return adapter

    def _cache_put(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.cache[lora_id] = adapter
        self.cache.move_to_end(lora_id)
        while len(self.cache) > self.max_cpu_loras:
            self.cache.popitem(last=False)

    # ---- per step -----------------------------------------------------------------------------------------
    def set_batch(self, seqs: Sequence[ScheduledSeq]) -> None:
        """Route this step's tokens: registers adapters from setups, puts each adapter of the step in a slot
        (least recently used slots not needed by this step are overwritten), builds the per-token slot index."""
        self._step += 1
        for s in seqs:
            if s.setup is not None and s.setup.lora is not None:
                request = LoRARequest.from_wire(s.setup.lora)
                if self.requests.get(request.lora_int_id) != request:
                    self.add(request)
        wanted = {s.lora_id for s in seqs if s.lora_id}
        if not wanted:
            self.batch.clear()  # base-only step: the wrapped layers skip the adapter math entirely
            return
        if len(wanted) > self.max_loras:
            raise ValueError(f"{len(wanted)} adapters in one step but max_loras={self.max_loras}: the scheduler "
                             "must cap the distinct adapters running at max_loras")
        slot_of = {lora_id: self._slot(lora_id, wanted) for lora_id in sorted(wanted)}
        self.batch.set([slot_of[s.lora_id] if s.lora_id else -1 for s in seqs], [len(s.token_ids) for s in seqs],
                       self.device)

    def _slot(self, lora_id: int, wanted: set[int]) -> int:
        if lora_id in self.slot_ids:
            slot = self.slot_ids.index(lora_id)
        else:
            free = [s for s, i in enumerate(self.slot_ids) if i is None]
            slot = free[0] if free else min((s for s, i in enumerate(self.slot_ids) if i not in wanted),
                                            key=lambda s: self.slot_last_use[s])
            self._write_slot(slot, lora_id)
        self.slot_last_use[slot] = self._step
        return slot

    def _write_slot(self, slot: int, lora_id: int) -> None:
        adapter = self._adapter(lora_id)
        by_layer: dict[int, dict[str, Any]] = {}
        for (layer, target), weights in adapter.modules.items():
            by_layer.setdefault(layer, {})[target] = weights
        for layer, wrapped in self.layers.items():
            for w in wrapped:
                w.set_slot(slot, by_layer.get(layer, {}))
        self.slot_ids[slot] = lora_id
        self.num_swaps += 1

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: loads from disk, slot writes (swaps), adapters in memory and in slots."""
        return {"loads": self.num_loads, "swaps": self.num_swaps, "loaded": len(self.cache),
                "active": sum(i is not None for i in self.slot_ids), "max_loras": self.max_loras,
                "slot_bytes": sum(w.num_bytes for ws in self.layers.values() for w in ws)}
