"""Resident memory: read it (the start log), and hand freed heap back to the OS after loading. No torch.

Loading leaves hundreds of MB of freed-but-kept heap behind: the Gemma tokenizer's 33 MB tokenizer.json
parses into ~440 MB of temporaries of which ~30 MB stay live, and glibc keeps freed small chunks in its arenas
until asked (malloc_trim). Trimming once after loading is cheap (milliseconds) and shrinks RSS at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os


def release_free_memory() -> bool:
    """Collect garbage and return freed heap pages to the OS (glibc malloc_trim). False where unsupported."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it has glibc's malloc_trim (not on musl or macOS), else None."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def resident_bytes(pid: int | None = None) -> int:
    """VmRSS of one process (this one by default), 0 when it cannot be read (gone, or no /proc)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_resident_bytes(pid: int | None = None) -> int:
    """RSS of a process and all its descendants (the server plus its engine core): what the machine pays."""
    import psutil

    try:
        root = psutil.Process(pid or os.getpid())
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    return sum(resident_bytes(p.pid) for p in procs)
