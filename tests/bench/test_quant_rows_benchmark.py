"""benchmarks/quant_rows.py's parts on small random weights: the interleaved timing reports a median per
library around a real int8 product, and fused parts stack along the rows. (Its library builds, ~10 s of
compiling, are left to the benchmark's own runs.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from benchmarks import quant_rows as bench
from tests.fixtures.quant_blocks import random_blocks
from tokenmill.kernels import quant_reference as ref
from tokenmill.kernels.cpu_kernels import load_cpu_kernels


@pytest.fixture(scope="module")
def lib():
    kernels = load_cpu_kernels()
    if kernels is None:
        pytest.skip("native kernels unavailable (no C++ compiler)")
    return kernels.quant


def _gguf(shapes: dict[str, tuple[int, int]]) -> SimpleNamespace:
    """What load_parts reads of a GGUF file: per tensor its type, shape and block bytes."""
    return SimpleNamespace(tensors={name: SimpleNamespace(ggml_type=T.Q5_0, shape=shape,
                                                          data=random_blocks("Q5_0", *shape, seed=i))
                                    for i, (name, shape) in enumerate(shapes.items())})


def test_fused_parts_stack_along_the_output_rows():
    parts = bench.load_parts(_gguf({"q": (64, 256), "k": (32, 256), "v": (32, 256)}), ["q", "k", "v"])
    assert [(off, w.shape) for off, w in parts] == [(0, (64, 256)), (64, (32, 256)), (96, (32, 256))]
    assert parts[1][1].blocks.dtype == torch.uint8 and parts[1][1].blocks.shape == (32, 8 * 22)


def test_interleaved_timing_runs_the_product_for_each_library(lib):
    parts = bench.load_parts(_gguf({"w": (48, 512)}), ["w"])
    plans = {"old": lib.plan(parts), "new": lib.plan(parts)}
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(0))
    out = torch.empty(9, 48)
    med = bench.interleaved({"old": lib, "new": lib}, plans, x, out, reps=3)
    assert set(med) == {"old", "new"} and all(wall > 0 and cpu >= 0 for wall, cpu in med.values())
    want = ref.gemm_int8(x, parts[0][1])
    assert np.allclose(out.double().numpy(), want.numpy(), atol=1e-4 * want.abs().max().item())
