"""CPU cores and threads for an engine: core lists ("0-3", "0,2,4", "0-1,4"), pinning, per-replica shares.

Replicas that share a machine must not share cores: every engine sizing its thread pool to the whole machine
makes them fight (two replicas ran 5x slower than one). The engine core process is pinned to its cores
(vLLM's VLLM_CPU_OMP_THREADS_BIND) and its intra-op thread count defaults to the cores it may use.
No torch at module level: the gateway and the CLIs import the parsing and planning functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger("tokenmill.cpu")


@dataclass(frozen=True, slots=True)
class CpuPlacement:
    """The cores an engine process runs on and its intra-op thread count (threads >= 1)."""

    cores: tuple[int, ...]
    num_threads: int
    pinned: bool  # True when cpu_cores was given (the process affinity was set)


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask: what taskset, cgroups and containers allow)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def parse_cpu_list(text: str | Iterable[int], field: str = "cpu_cores") -> tuple[int, ...]:
    """"0-3", "0,2,4", "0-1,4" (or ints) -> sorted distinct core ids; ValueError naming `field` otherwise."""
    if not isinstance(text, str):
        items = list(text)
        if not items or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items):
            raise ValueError(f"invalid {field}={items!r}: must be non-negative core ids, e.g. [0, 1]")
        return tuple(sorted(set(items)))
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"invalid {field}={text!r}: {part!r} is not a core id or a range; "
                             "use a list like 0-3, 0,2,4 or 0-1,4") from None
        if first < 0 or last < first:
            raise ValueError(f"invalid {field}={text!r}: range {part!r} must run from a lower to a higher "
                             "non-negative core id, e.g. 0-3")
        cores.update(range(first, last + 1))
    return tuple(sorted(cores))


def format_cpu_list(cores: Iterable[int]) -> str:
    """Sorted core ids -> the compact form parse_cpu_list reads: (0, 1, 2, 5) -> "0-2,5"."""
    out: list[str] = []
    ids = sorted(set(cores))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def resolve_placement(num_threads: int | None, cpu_cores: Sequence[int] | None,
                      available: Sequence[int] | None = None) -> CpuPlacement:
    """Check the request against the cores this process may use; ValueError names the field and what is allowed."""
    allowed = tuple(available) if available is not None else available_cores()
    if cpu_cores is not None:
        missing = sorted(set(cpu_cores) - set(allowed))
        if not cpu_cores or missing:
            raise ValueError(f"invalid cpu_cores={format_cpu_list(cpu_cores) or '(empty)'}: "
                             f"core(s) {format_cpu_list(missing) or 'none'} not available; "
                             f"this process may use cores {format_cpu_list(allowed)}")
    cores = tuple(sorted(cpu_cores)) if cpu_cores is not None else allowed
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"invalid num_threads={num_threads!r}: must be a positive integer")
    return CpuPlacement(cores=cores, num_threads=num_threads or len(cores), pinned=cpu_cores is not None)


def pin_process(cores: Sequence[int]) -> None:
    """Set the affinity of every thread of this process (threads started later inherit it)."""
    target = set(cores)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread, which later threads inherit from
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, target)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def apply_placement(num_threads: int | None, cpu_cores: Sequence[int] | None) -> CpuPlacement:
    """Pin this process to cpu_cores (when given) and set torch's intra-op threads; idempotent."""
    import torch

    placement = resolve_placement(num_threads, cpu_cores)
    if placement.pinned and set(placement.cores) != set(available_cores()):
        pin_process(placement.cores)
    if torch.get_num_threads() != placement.num_threads:
        torch.set_num_threads(placement.num_threads)
    where = "pinned to" if placement.pinned else "may use"
    log.info("engine: %d thread(s), %s core(s) %s", placement.num_threads, where, format_cpu_list(placement.cores))
    return placement


def plan_core_shares(cores: Sequence[int], num_replicas: int) -> list[tuple[int, ...]]:
    """Split `cores` into `num_replicas` disjoint contiguous shares (sizes differ by at most one). With more
    replicas than cores every replica gets one core, and replica i shares core i % len(cores)."""
    ids = sorted(set(cores))
    if num_replicas < 1 or not ids:
        raise ValueError(f"plan_core_shares: need >= 1 replica and >= 1 core, got {num_replicas} and {len(ids)}")
    if num_replicas > len(ids):
        return [(ids[i % len(ids)],) for i in range(num_replicas)]
    base, extra = divmod(len(ids), num_replicas)
    shares, start = [], 0
    for i in range(num_replicas):
        size = base + (1 if i < extra else 0)
        shares.append(tuple(ids[start:start + size]))
        start += size
    return shares
