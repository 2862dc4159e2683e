"""Native CPU kernels (csrc/*.cpp), built into one library on first use with the system C++ compiler.

The library has no torch headers, so it compiles in about a second; it is cached under the tokenmill cache
dir keyed by the source, compiler, flags and CPU, and loaded with ctypes (ctypes releases the GIL during
the call). It links OpenMP like torch does, so on Linux both share torch's already-loaded libgomp runtime.
When no compiler is found or the build fails, `load_cpu_kernels()` returns None with the reason logged and
callers keep the plain-PyTorch path. Set TOKENMILL_CPU_KERNELS=0 to disable them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "TOKENMILL_CPU_KERNELS"
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("cpu_kernels.cpp", "panel_gemm.cpp")]
_HEADERS = [Path(__file__).with_name("csrc") / "wide_vector.h"]  # part of the build key, not compiled alone
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp"]
_ABI_VERSION = 2
# Pointers travel as plain ints (c_void_p): ctypes.cast per argument cost more than the small kernels.
_i64, _f32p, _i64p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p


@dataclass(frozen=True)
class PanelWeight:
    """A [n, k] weight repacked for panel_gemm (see csrc/panel_gemm.cpp); `panels` owns the memory."""

    panels: torch.Tensor
    n: int
    k: int


class CpuKernels:
    """Typed wrappers over the loaded library; every tensor argument is checked before its pointer is used."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._decode = lib.decode_attention_f32
        self._decode.restype = None
        self._decode.argtypes = [_f32p, _f32p, _f32p, _i64p, _i64, _i64p, _i64p, _i64p,
                                 _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _f32p, ctypes.c_int]
        self._argmax = lib.argmax_rows_f32
        self._argmax.restype = None
        self._argmax.argtypes = [_f32p, _i64, _i64, _i64, _i64p, ctypes.c_int]
        self._rms_norm = lib.rms_norm_f32
        self._rms_norm.restype = None
        self._rms_norm.argtypes = [_f32p, _f32p, _i64, _i64, _i64, _i64, ctypes.c_float, _f32p, ctypes.c_int]
        self._gelu_mul = lib.gelu_tanh_and_mul_f32
        self._gelu_mul.restype = None
        self._gelu_mul.argtypes = [_f32p, _i64, _i64, _i64, _f32p, ctypes.c_int]
        self.panel_width = lib.panel_gemm_width()
        self._pack = lib.pack_panels_f32
        self._pack.restype = None
        self._pack.argtypes = [_f32p, _i64, _i64, _i64, _f32p, ctypes.c_int]
        self._panel_gemm = lib.panel_gemm_f32
        self._panel_gemm.restype = None
        self._panel_gemm.argtypes = [_f32p, _i64, _i64, _i64, _f32p, _i64, _f32p, _i64, ctypes.c_int]

    def pack_panels(self, weight: torch.Tensor) -> PanelWeight:
        """Repack a CPU float32 weight [n, k] (rows contiguous) for panel_gemm; the source can then be freed."""
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.stride(1) != 1:
            raise ValueError("pack_panels: weight must be a 2-D CPU float32 tensor with contiguous rows")
        n, k = weight.shape
        panels = torch.empty(-(-n // self.panel_width) * k * self.panel_width, dtype=torch.float32)
        self._pack(weight.data_ptr(), n, k, weight.stride(0), panels.data_ptr(), torch.get_num_threads())
        return PanelWeight(panels, n, k)

    def panel_gemm(self, x: torch.Tensor, weight: PanelWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., k] @ W.T -> [..., n] in float32, written into `out` ([rows, n], rows contiguous) when given."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != weight.k:
            raise ValueError(f"panel_gemm: x must be CPU float32 [..., {weight.k}], got {x.dtype} {tuple(x.shape)}")
        rows = x.numel() // weight.k if weight.k else math.prod(x.shape[:-1])
        x2 = x.reshape(rows, weight.k)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        if out is None:
            out = torch.empty((rows, weight.n), dtype=torch.float32)
        elif out.shape != (rows, weight.n) or out.dtype != torch.float32 or out.device.type != "cpu" or out.stride(1) != 1:
            raise ValueError(f"panel_gemm: out must be CPU float32 [{rows}, {weight.n}] with contiguous rows")
        self._panel_gemm(x2.data_ptr(), rows, weight.k, x2.stride(0), weight.panels.data_ptr(), weight.n,
                         out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out.view(*x.shape[:-1], weight.n)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim (weight already holds any offset)."""
        n = x.shape[-1]
        if x.dtype != torch.float32 or x.device.type != "cpu" or weight.shape != (n,) or weight.dtype != torch.float32 \
                or not weight.is_contiguous():
            raise ValueError(f"rms_norm: needs CPU float32 x [..., {n}] and weight [{n}]")
        x2 = x.reshape(-1, n)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape, dtype=torch.float32)
        self._rms_norm(x2.data_ptr(), weight.data_ptr(), x2.shape[0], n, x2.stride(0), n, eps, out.data_ptr(),
                       torch.get_num_threads())
        return out.view(x.shape)

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 2n] = [gate | up] -> gelu(gate, approximate="tanh") * up, [T, n]."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] % 2 or x.stride(1) != 1:
            raise ValueError("gelu_tanh_and_mul: x must be a 2-D CPU float32 [T, 2n] tensor with contiguous rows")
        n = x.shape[1] // 2
        out = torch.empty((x.shape[0], n), dtype=torch.float32)
        self._gelu_mul(x.data_ptr(), x.shape[0], n, x.stride(0), out.data_ptr(), torch.get_num_threads())
        return out

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """torch.argmax(x, dim=-1) for a 2-D float32 CPU tensor with contiguous rows (same ties, same NaNs)."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1 or x.shape[1] == 0:
            raise ValueError("argmax_rows: x must be a non-empty 2-D CPU float32 tensor with contiguous rows")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), torch.get_num_threads())
        return out

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         blocks: torch.Tensor, first_pos: torch.Tensor, lo: torch.Tensor, ctx: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """q [B, Hq, D] -> [B, Hq, D]; sequence b attends to positions lo[b] <= p < ctx[b], found in
        blocks[b, (p - first_pos[b]) // block_size] of the [N, block_size, Hkv, D] caches."""
        bsz, num_heads, head_dim = q.shape
        num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
        if cache_dim != head_dim or num_heads % num_kv_heads or v_cache.shape != k_cache.shape:
            raise ValueError(f"decode_attention: shapes q {tuple(q.shape)} / cache {tuple(k_cache.shape)} disagree")
        for name, t, dtype in (("q", q, torch.float32), ("k_cache", k_cache, torch.float32),
                               ("v_cache", v_cache, torch.float32), ("blocks", blocks, torch.int64),
                               ("first_pos", first_pos, torch.int64), ("lo", lo, torch.int64), ("ctx", ctx, torch.int64)):
            if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"decode_attention: {name} must be a contiguous CPU {dtype} tensor")
        if blocks.dim() != 2 or blocks.shape[0] != bsz or not (first_pos.numel() == lo.numel() == ctx.numel() == bsz):
            raise ValueError("decode_attention: blocks must be [B, nb] and first_pos/lo/ctx [B]")
        out = torch.empty_like(q)
        self._decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), blocks.data_ptr(),
                     blocks.shape[1], first_pos.data_ptr(), lo.data_ptr(), ctx.data_ptr(),
                     bsz, num_heads, num_kv_heads, head_dim, block_size, scale, out.data_ptr(),
                     torch.get_num_threads())
        return out


def load_cpu_kernels() -> CpuKernels | None:
    """Build (once per machine) and load the native kernels; None when disabled or unavailable."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        logger.info("native CPU kernels disabled: no C++ compiler (g++/c++/clang++) found; using PyTorch paths")
        return None
    from tokenmill.model.cache_dir import get_or_build

    key = hashlib.sha256(b"|".join([*(src.read_bytes() for src in _SOURCES + _HEADERS), compiler.encode(), _compiler_version(compiler), " ".join(_FLAGS).encode(),
                                    _cpu_signature().encode()])).hexdigest()

    def build(tmp: Path) -> None:
        # Without OpenMP (e.g. Apple clang) the pragmas are ignored: same results, one thread per kernel.
        for flags in (_FLAGS, [f for f in _FLAGS if f != "-fopenmp"]):
            cmd = [compiler, *flags, *map(str, _SOURCES), "-o", str(tmp / "libtokenmill_cpu.so")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                return
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")

    try:
        path = get_or_build("kernels", key, build) / "libtokenmill_cpu.so"
        lib = ctypes.CDLL(str(path))
        if lib.tokenmill_kernels_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{path}: ABI version mismatch")
        return CpuKernels(lib, path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("native CPU kernels unavailable (%s); using PyTorch paths", exc)
        return None


def _compiler_version(compiler: str) -> bytes:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _cpu_signature() -> str:
    """-march=native output is only valid on the same kind of CPU: key the cache on its feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
