"""On-disk cache for expensive conversions (GGUF tokenizers, dequantized weights), keyed by file hash.

Layout: <root>/<kind>/<sha256 of the source file>/... . The root is $TOKENMILL_CACHE, else
~/.cache/tokenmill. Hashing a 250 MB GGUF costs about a second, so the hash itself is memoised per
(absolute path, size, mtime_ns) in <root>/hashes/: a later start reads one small file instead.
Writers build into a temporary sibling directory and rename it into place, so a crashed or concurrent
writer never leaves a half-written entry that a reader would trust.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "TOKENMILL_CACHE"


def cache_root() -> Path:
    """The cache root directory (created on demand)."""
    root = os.environ.get(ENV_VAR)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "tokenmill"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def file_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime) so that it is computed once."""
    real = Path(path).resolve()
    st = real.stat()
    stamp = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "hashes" / stamp
    try:
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    value = sha256_file(real)
    memo.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(memo, value)
    return value


def entry_dir(kind: str, key: str) -> Path:
    """Where the cache entry (kind, key) lives; it may not exist yet."""
    return cache_root() / kind / key


def get_or_build(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return the directory of entry (kind, key), calling build(tmp_dir) to fill it the first time."""
    final = entry_dir(kind, key)
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok")
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same entry first (rename onto a non-empty dir fails).
            if not (final / ".complete").exists():
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
