"""What a model tells the engine about its KV cache: which layers share one block table.

A contract between `model/` (which declares it) and `engine/` (which schedules blocks by it). It lives
outside both, torch-free, so models never import an engine module and the engine never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class KVCacheGroupSpec:
    """Layers that share one block table. sliding_window=None means full attention."""

    layer_ids: list[int]
    sliding_window: int | None = None
