"""Fused linear layers and the weight-loading helpers that fill their shards.

The checkpoint keeps q/k/v (and gate/up) as separate tensors; we fuse them into one matmul because on CPU
one larger GEMM beats three small ones. Each fused layer knows where each named shard lives.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """nn.Linear whose output rows are the concatenation of named shards (e.g. q, k, v)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.shard_sizes = list(shard_sizes.values())

    def load_shard(self, shard: str, loaded: torch.Tensor, is_bias: bool = False) -> None:
        offset, size = self.shard_offsets[shard]
        target = self.bias if is_bias else self.weight
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard!r}: checkpoint has {tuple(loaded.shape)}, expected first dim {size}")
        with torch.no_grad():
            target[offset : offset + size].copy_(loaded)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.shard_sizes, dim=-1)


def copy_weight(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter, casting dtype; shape mismatches name the tensor."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"weight {name!r}: checkpoint shape {tuple(loaded.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """Same [out, in] values stored transposed. F.linear then multiplies x by a contiguous [in, out] matrix,
    which MKL runs several times faster on CPU than the row-major layout for decode-sized batches."""
    return weight.detach().t().contiguous().t()


def relayout_linears_for_cpu(model: nn.Module) -> None:
    """Store every nn.Linear weight column-major (CPU only; called once after loading)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            module.weight = nn.Parameter(column_major(module.weight), requires_grad=False)


class PackedLinear:
    """x @ W^T with W prepacked for oneDNN (CPU, float32). For a few rows against a very wide W (the LM head:
    one row per sampled sequence, 49k-262k columns) this measured about 2x MKL on the column-major layout."""

    def __init__(self, weight: torch.Tensor):
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def try_pack(weight: torch.Tensor) -> PackedLinear | None:
    """A PackedLinear when oneDNN can run this weight (CPU, float32), else None (callers use F.linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = PackedLinear(weight)
        probe = torch.zeros(1, weight.shape[1])
        if packed(probe).shape != (1, weight.shape[0]):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None
