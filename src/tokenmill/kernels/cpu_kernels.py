"""Native CPU kernels (csrc/*.cpp), built into one library on first use with the system C++ compiler.

The library has no torch headers, so it compiles in about a second; it is cached under the tokenmill cache
dir keyed by the source, compiler, flags, variant and CPU, and loaded with ctypes (ctypes releases the GIL
during the call). It links OpenMP like torch does, so on Linux both share torch's already-loaded libgomp.

One source, one build per instruction-set variant (VARIANTS: `-march` named explicitly, so a library never
holds instructions its variant does not list); `load_cpu_kernels()` loads the widest variant this CPU runs.
Every kernel takes float32 or bf16 data (bf16 widened to float32 on load, rounded to nearest even on store;
the arithmetic is float32 in every variant) and has a plain-PyTorch oracle (tests/model/test_cpu_kernels.py
runs each variant the test machine can execute). bf16 *matrix* products on CPUs with AMX / AVX512-BF16 go
through oneDNN (layers/linear.py), not through these kernels.
When no compiler is found or the build fails, `load_cpu_kernels()` returns None with the reason logged and
callers keep the plain-PyTorch path. TOKENMILL_CPU_KERNELS=0 disables them; =<variant> picks one (tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.kernels.cpu_features import CpuFeatures, host_cpu_features
from tokenmill.kernels.decode_ops import DecodeOps
from tokenmill.kernels.decode_step import DecodeStepKernel
from tokenmill.kernels.quant_kernels import QuantKernels, bind

logger = logging.getLogger(__name__)

ENV_VAR = "TOKENMILL_CPU_KERNELS"
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("cpu_kernels.cpp", "decode_ops.cpp", "decode_step.cpp",
                                                                    "panel_gemm.cpp", "quant_gemm.cpp")]
_HEADERS = [Path(__file__).with_name("csrc") / name for name in (
    "wide_vector.h", "vec_math.h", "decode_attention.h", "decode_ops.h", "panel_kernel.h", "quant_blocks.h", "quant_dot.h",
    "quant_int8.h", "quant_x8.h")]  # build key only
_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp", "-Wno-psabi"]
_ABI_VERSION = 8


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its -march flags and the CPU features (x86 flag names) it needs to run."""

    name: str
    march: tuple[str, ...]
    needs: frozenset[str]

    def runs_on(self, cpu: CpuFeatures) -> bool:
        return self.needs <= cpu.flags


# Widest first. avx512vnni adds the 8-bit dot product instruction (vpdpbusd) for the quantized kernels.
# x86-64-v4 = AVX-512 F/BW/CD/DQ/VL (16-float vectors), v3 = AVX2 + FMA + F16C + BMI (8-float
# vectors), the x86-64 baseline = SSE2 (8-float vectors as SSE pairs). Other machines: the host's own -march.
X86_VARIANTS = (
    Variant("avx512vnni", ("-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"),
            frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c",
                       "bmi2"})),
    Variant("avx512", ("-march=x86-64-v4", "-mtune=generic"),
            frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "f16c", "bmi2"})),
    Variant("avx2", ("-march=x86-64-v3", "-mtune=generic"),
            frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"})),
    Variant("base", ("-march=x86-64", "-mtune=generic"), frozenset()),
)
NATIVE_VARIANT = Variant("native", ("-march=native",), frozenset())
# Pointers travel as plain ints (c_void_p): ctypes.cast per argument cost more than the small kernels.
_i64, _f32p, _i64p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p


@dataclass(frozen=True)
class PanelWeight:
    """A [n, k] weight repacked for panel_gemm (see csrc/panel_gemm.cpp); `panels` owns the memory."""

    panels: torch.Tensor  # float32 or bfloat16: the product accumulates in float32 either way
    n: int
    k: int


class CpuKernels:
    """Typed wrappers over the loaded library; every tensor argument is checked before its pointer is used."""

    def __init__(self, lib: ctypes.CDLL, path: Path, variant: str):
        self.path = path
        self.variant = variant
        self.quant = QuantKernels(lib)  # GGUF-block products (kernels/quant_kernels.py)
        self.decode_ops = DecodeOps(lib)  # the small per-layer steps of a decode (kernels/decode_ops.py)
        self.decode_step = DecodeStepKernel(lib)  # all layers of a decode step in one call (kernels/decode_step.py)
        self._checked_meta: tuple | None = None  # decode_attention's last metadata tensors, already checked
        decode_args = [_f32p, _f32p, _f32p, _i64p, _i64, _i64p, _i64p, _i64p, _i64p,
                       _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _f32p, ctypes.c_int]
        self._decode = {torch.float32: _fn(lib.decode_attention_f32, decode_args),
                        torch.bfloat16: _fn(lib.decode_attention_bf16, decode_args)}
        self._sample = _fn(lib.sample_rows_f32, [_f32p, _i64, _i64, _i64, _f32p, _i64p, ctypes.c_int])
        self._argmax = lib.argmax_rows_f32
        self._argmax.restype = None
        self._argmax.argtypes = [_f32p, _i64, _i64, _i64, _i64p, ctypes.c_int]
        self._rms_norm_f32 = _fn(lib.rms_norm_f32, [_f32p, _f32p, _i64, _i64, _i64, _i64, ctypes.c_float, _f32p,
                                                    ctypes.c_int])
        self._rms_norm_bf16 = _fn(lib.rms_norm_bf16, [_f32p, _f32p, _i64, _i64, _i64, _i64, ctypes.c_float,
                                                      ctypes.c_int, _f32p, ctypes.c_int])
        gelu_args = [_f32p, _i64, _i64, _i64, _f32p, ctypes.c_int]
        self._gelu_mul = {torch.float32: _fn(lib.gelu_tanh_and_mul_f32, gelu_args),
                          torch.bfloat16: _fn(lib.gelu_tanh_and_mul_bf16, gelu_args)}
        self._to_bf16 = _fn(lib.bf16_from_f32, [_f32p, _i64, _f32p, ctypes.c_int])
        self.panel_width = lib.panel_gemm_width()
        pack_args = [_f32p, _i64, _i64, _i64, _f32p, ctypes.c_int]
        self._pack = {torch.float32: _fn(lib.pack_panels_f32, pack_args),
                      torch.bfloat16: _fn(lib.pack_panels_bf16, pack_args)}
        gemm_args = [_f32p, _i64, _i64, _i64, _f32p, _i64, _f32p, _i64, ctypes.c_int]
        self._panel_gemm = {torch.float32: _fn(lib.panel_gemm_f32, gemm_args),
                            torch.bfloat16: _fn(lib.panel_gemm_bf16w, gemm_args)}

    def pack_panels(self, weight: torch.Tensor) -> PanelWeight:
        """Repack a CPU float32 or bf16 weight [n, k] (rows contiguous) for panel_gemm, keeping its dtype; the
        source can then be freed."""
        if weight.dim() != 2 or weight.dtype not in self._pack or weight.device.type != "cpu" or weight.stride(1) != 1:
            raise ValueError("pack_panels: weight must be a 2-D CPU float32/bfloat16 tensor with contiguous rows")
        n, k = weight.shape
        panels = torch.empty(-(-n // self.panel_width) * k * self.panel_width, dtype=weight.dtype)
        self._pack[weight.dtype](weight.data_ptr(), n, k, weight.stride(0), panels.data_ptr(), torch.get_num_threads())
        return PanelWeight(panels, n, k)

    def panel_gemm(self, x: torch.Tensor, weight: PanelWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., k] @ W.T -> [..., n] in float32, written into `out` ([rows, n], rows contiguous) when given.
        A bf16 x is widened to float32 first (exact); products accumulate in float32 for either weight dtype."""
        if x.dtype == torch.bfloat16:
            x = x.float()
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
        self._panel_gemm[weight.panels.dtype](x2.data_ptr(), rows, weight.k, x2.stride(0), weight.panels.data_ptr(), weight.n,
                         out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out.view(*x.shape[:-1], weight.n)

    def to_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU float32 tensor rounded to bf16 (nearest even, as .to(torch.bfloat16)), in parallel."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError("to_bf16: x must be a CPU float32 tensor")
        src = x.contiguous()
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        self._to_bf16(src.data_ptr(), src.numel(), out.data_ptr(), torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, round_first: bool = False) -> torch.Tensor:
        """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim (weight: float32, already holding any
        offset), computed in float32 for a float32 or bf16 x and returned in x's dtype. round_first (bf16 only):
        round the normalised x to bf16 before the weight multiplies it (Llama's order; Gemma's is float32).
        (A decode step runs ~100 of these on a few rows each: the checks use only cheap tensor attributes.)"""
        n = x.shape[-1]
        dtype = x.dtype
        if (dtype is not torch.float32 and dtype is not torch.bfloat16) or not x.is_cpu or weight.dim() != 1 \
                or weight.shape[0] != n or weight.dtype is not torch.float32 or not weight.is_contiguous():
            raise ValueError(f"rms_norm: needs CPU float32/bfloat16 x [..., {n}] and float32 weight [{n}]")
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty_like(x)
        args = (x.data_ptr(), weight.data_ptr(), x.numel() // n if n else 0, n, n, n, eps)
        if dtype is torch.float32:
            self._rms_norm_f32(*args, out.data_ptr(), torch.get_num_threads())
        else:
            self._rms_norm_bf16(*args, int(round_first), out.data_ptr(), torch.get_num_threads())
        return out

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 2n] = [gate | up] -> gelu(gate, approximate="tanh") * up, [T, n], float32 or bf16 (in x's dtype)."""
        if x.dim() != 2 or x.dtype not in self._gelu_mul or not x.is_cpu or x.shape[1] % 2 or x.stride(1) != 1:
            raise ValueError("gelu_tanh_and_mul: x must be a 2-D CPU float32/bfloat16 [T, 2n] tensor with contiguous rows")
        n = x.shape[1] // 2
        out = torch.empty((x.shape[0], n), dtype=x.dtype)
        self._gelu_mul[x.dtype](x.data_ptr(), x.shape[0], n, x.stride(0), out.data_ptr(), torch.get_num_threads())
        return out

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """torch.argmax(x, dim=-1) for a 2-D float32 CPU tensor with contiguous rows (same ties, same NaNs)."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1 or x.shape[1] == 0:
            raise ValueError("argmax_rows: x must be a non-empty 2-D CPU float32 tensor with contiguous rows")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), torch.get_num_threads())
        return out

    def sample_rows(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One token per row of logits x (2-D float32 CPU, contiguous rows) by inverse CDF with the uniforms u
        (float32 [rows] in [0, 1)): the first index whose running sum of exp(x - max) exceeds u * the row's sum
        (layers/sampler.py's torch path, without its [rows, vocab] exp and cumsum passes). -inf entries are never
        drawn; a row of only -inf gives the last index."""
        if x.dim() != 2 or x.dtype != torch.float32 or not x.is_cpu or x.stride(1) != 1 or x.shape[1] == 0:
            raise ValueError("sample_rows: x must be a non-empty 2-D CPU float32 tensor with contiguous rows")
        if u.dtype != torch.float32 or not u.is_cpu or not u.is_contiguous() or u.numel() != x.shape[0]:
            raise ValueError(f"sample_rows: u must be a contiguous CPU float32 tensor of {x.shape[0]} uniforms")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._sample(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), u.data_ptr(), out.data_ptr(),
                     torch.get_num_threads())
        return out

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         blocks: torch.Tensor, first_pos: torch.Tensor, lo: torch.Tensor, ctx: torch.Tensor,
                         scale: float, q_start: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D] float32: query row r attends to positions lo[r] <= p < ctx[r] of its
        sequence b, found in blocks[b, (p - first_pos[b]) // block_size] of the [N, block_size, Hkv, D] caches
        (float32 or bf16). Sequence b owns rows q_start[b] .. q_start[b+1]-1 (q_start [B+1], e.g. 1 + k rows
        when k drafts are verified); without q_start every sequence has one row (T = B)."""
        rows, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, cache_dim = k_cache.shape
        if cache_dim != head_dim or num_heads % num_kv_heads or v_cache.shape != k_cache.shape:
            raise ValueError(f"decode_attention: shapes q {tuple(q.shape)} / cache {tuple(k_cache.shape)} disagree")
        cache_dtype = k_cache.dtype if k_cache.dtype in self._decode else torch.float32
        for name, t, dtype in (("q", q, torch.float32), ("k_cache", k_cache, cache_dtype),
                               ("v_cache", v_cache, cache_dtype)):
            if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
                raise ValueError(f"decode_attention: {name} must be a contiguous CPU {dtype} tensor")
        bsz = rows if q_start is None else q_start.numel() - 1
        meta = (blocks, first_pos, lo, ctx, q_start)
        # Every layer of a step passes the same metadata tensors: they are checked once, on first sight.
        seen = self._checked_meta
        if seen is None or seen[0] != rows or any(a is not b for a, b in zip(meta, seen[1], strict=True)):
            _check_decode_meta(blocks, first_pos, lo, ctx, q_start, rows)
            self._checked_meta = (rows, meta)
        out = torch.empty_like(q)
        self._decode[cache_dtype](q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), blocks.data_ptr(),
                     blocks.shape[1], first_pos.data_ptr(), 0 if q_start is None else q_start.data_ptr(),
                     lo.data_ptr(), ctx.data_ptr(), bsz, num_heads, num_kv_heads, head_dim, block_size, scale,
                     out.data_ptr(), torch.get_num_threads())
        return out


def _check_decode_meta(blocks: torch.Tensor, first_pos: torch.Tensor, lo: torch.Tensor, ctx: torch.Tensor,
                       q_start: torch.Tensor | None, rows: int) -> None:
    for name, t in (("blocks", blocks), ("first_pos", first_pos), ("lo", lo), ("ctx", ctx), ("q_start", q_start)):
        if t is not None and (t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError(f"decode_attention: {name} must be a contiguous CPU int64 tensor")
    bsz = rows if q_start is None else q_start.numel() - 1
    if blocks.dim() != 2 or blocks.shape[0] != bsz or first_pos.numel() != bsz or not (lo.numel() == ctx.numel() == rows):
        raise ValueError("decode_attention: blocks must be [B, nb], first_pos [B] and lo/ctx [T]")
    if q_start is not None and _bad_starts(q_start, rows):
        raise ValueError(f"decode_attention: q_start must rise from 0 to {rows} (the rows of q)")


def _bad_starts(q_start: torch.Tensor, rows: int) -> bool:
    """Sequence row offsets must start at 0, end at the row count and never fall (the kernel trusts them).
    A list check: a few tensor ops would cost more than the attention of a short step."""
    starts = q_start.tolist()
    return not starts or starts[0] != 0 or starts[-1] != rows or any(a > b for a, b in itertools.pairwise(starts))


def _fn(f, argtypes: list) -> ctypes._CFuncPtr:
    return bind(f, argtypes, None)


def variants_for(cpu: CpuFeatures) -> list[Variant]:
    """The variants this CPU can run, widest first (x86: avx512 / avx2 / base; elsewhere: native)."""
    if cpu.machine not in ("x86_64", "amd64", "i686", "i386"):
        return [NATIVE_VARIANT]
    return [v for v in X86_VARIANTS if v.runs_on(cpu)]


def load_cpu_kernels(variant: str | None = None) -> CpuKernels | None:
    """Build (once per machine and variant) and load the native kernels; None when disabled or unavailable.

    variant None: TOKENMILL_CPU_KERNELS names one (or 0/off disables), else the widest this CPU runs. A named
    variant that this CPU cannot execute is refused (ValueError), never loaded."""
    setting = os.environ.get(ENV_VAR, "1").strip().lower()
    if variant is None and setting in ("0", "false", "no", "off"):
        return None
    if variant is None and setting not in ("1", "true", "yes", "on", "auto", ""):
        variant = setting
    runnable = variants_for(host_cpu_features())
    if variant is None:
        chosen = runnable
    else:
        chosen = [v for v in runnable if v.name == variant]
        if not chosen:
            raise ValueError(f"{ENV_VAR}={variant!r}: this CPU runs the variants {[v.name for v in runnable]} "
                             "(or 0 to disable the native kernels)")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        logger.info("native CPU kernels disabled: no C++ compiler (g++/c++/clang++) found; using PyTorch paths")
        return None
    for v in chosen:  # a compiler too old for an -march level falls through to the next narrower variant
        kernels = _build_and_load(compiler, v)
        if kernels is not None:
            return kernels
    return None


def _build_and_load(compiler: str, variant: Variant) -> CpuKernels | None:
    from tokenmill.model.cache_dir import get_or_build

    flags = [*_FLAGS, *variant.march]
    key = hashlib.sha256(b"|".join([*(src.read_bytes() for src in _SOURCES + _HEADERS), compiler.encode(),
                                    _compiler_version(compiler), " ".join(flags).encode(), variant.name.encode(),
                                    _cpu_signature().encode()])).hexdigest()

    def build(tmp: Path) -> None:
        # Without OpenMP (e.g. Apple clang) the pragmas are ignored: same results, one thread per kernel.
        for fl in (flags, [f for f in flags if f != "-fopenmp"]):
            cmd = [compiler, *fl, *map(str, _SOURCES), "-o", str(tmp / "libtokenmill_cpu.so")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if proc.returncode == 0:
                return
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")

    try:
        path = get_or_build("kernels", key, build) / "libtokenmill_cpu.so"
        lib = ctypes.CDLL(str(path))
        if lib.tokenmill_kernels_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{path}: ABI version mismatch")
        return CpuKernels(lib, path, variant.name)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("native CPU kernels unavailable (%s build: %s); using PyTorch paths", variant.name, exc)
        return None


def _compiler_version(compiler: str) -> bytes:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _cpu_signature() -> str:
    """The CPU's feature flags: a cache directory shared between machines builds once per kind of CPU (the
    variant's explicit -march already keeps a library off CPUs without its instructions; the native variant
    and -mtune choices are only valid on the CPU that built them)."""
    cpu = host_cpu_features()
    return " ".join([cpu.machine, *sorted(cpu.flags)])
