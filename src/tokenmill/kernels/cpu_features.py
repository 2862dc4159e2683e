"""What this CPU can do, read once from /proc/cpuinfo, and the choices that follow from it.

Three kinds of x86 machine run this project and its CI (and most rented CPUs are one of them):
- AVX2 only (e.g. AMD EPYC Rome/Milan): no native bf16; a bf16 matmul is emulated and ~100x slower than fp32;
- AVX-512 without bf16 (e.g. Xeon Skylake/Cascade Lake): wider vectors, still no native bf16;
- AVX-512 with AVX512-BF16 and/or AMX (Xeon Sapphire Rapids and later, AMD Zen 4+): oneDNN multiplies bf16
  natively (AMX tiles, or VDPBF16PS), 2.5-6x fp32 on our shapes.
`TOKENMILL_CPU_FLAGS` (space-separated flag names) replaces what /proc/cpuinfo says: tests use it to check the
policy for a CPU the suite is not running on. Only choices read it (which dtype, which kernel variant to
prefer); a kernel variant is never *loaded* on a CPU that lacks its instructions (kernels/cpu_kernels.py
reads the real flags, `host_cpu_features`).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

ENV_VAR = "TOKENMILL_CPU_FLAGS"


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """The CPU's feature flags (lower case, as /proc/cpuinfo spells them) and the machine name."""

    flags: frozenset[str]
    machine: str

    @property
    def avx2(self) -> bool:
        return {"avx2", "fma"} <= self.flags

    @property
    def avx512(self) -> bool:  # the x86-64-v4 set: what -march=x86-64-v4 code may use
        return {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= self.flags and self.avx2

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags and self.avx512

    @property
    def amx_bf16(self) -> bool:
        return {"amx_bf16", "amx_tile"} <= self.flags

    @property
    def native_bf16(self) -> bool:
        """True when bf16 matrix products run on the CPU's own units (AMX tiles or AVX512-BF16 dot products)."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def isa(self) -> str:
        """The widest instruction set tier, for logs and the build key: amx | avx512_bf16 | avx512 | avx2 | base."""
        if self.amx_bf16:
            return "amx"
        if self.avx512_bf16:
            return "avx512_bf16"
        if self.avx512:
            return "avx512"
        return "avx2" if self.avx2 else "base"

    def describe(self) -> str:
        extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni") if f in self.flags]
        return f"{self.machine} {self.isa}" + (f" ({', '.join(extras)})" if extras else "")


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The first 'flags' (x86) or 'Features' (ARM) line of a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def host_cpu_features() -> CpuFeatures:
    """What this CPU really has (never overridden): decides which native code may be loaded."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = parse_flags(f.read())
    except OSError:
        flags = frozenset()
    return CpuFeatures(flags, platform.machine().lower())


def cpu_features() -> CpuFeatures:
    """The features that policy decisions read: the host's, unless TOKENMILL_CPU_FLAGS names others."""
    override = os.environ.get(ENV_VAR)
    if override is None:
        return host_cpu_features()
    return CpuFeatures(frozenset(override.lower().split()), host_cpu_features().machine)
