"""Resolve a model name to a local path, offline: a folder, a .gguf file, or a repo in the HF cache.

Accepted names:
  /path/to/folder | /path/to/model.gguf      used as is
  org/name                                   HF cache snapshot (refs/main, else the newest snapshot);
                                             a snapshot holding only GGUF files resolves to its one .gguf
  org/name:TAG  or  org/name/file.gguf       pick one GGUF in that snapshot (TAG matches a file name,
                                             case-insensitively, e.g. ":Q4_K_M", Ollama-style)
Nothing is ever downloaded. The error for an unknown name lists every place that was tried.
"""

from __future__ import annotations

import os
from pathlib import Path


def hf_cache_dirs() -> list[Path]:
    """Hub cache directories in transformers' order of precedence."""
    dirs: list[Path] = []
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def resolve_model(name: str) -> str:
    """Local path for `name`; ValueError listing everything tried when nothing matches."""
    tried: list[str] = []
    direct = Path(name).expanduser()
    if direct.is_dir() or (direct.is_file() and direct.suffix == ".gguf"):
        return str(direct)
    tried.append(f"a local folder or .gguf file at {str(direct)!r} (not found)")
    repo, selector = _split(name)
    if repo.count("/") == 1:
        for cache in hf_cache_dirs():
            entry = cache / ("models--" + repo.replace("/", "--"))
            snapshot = _snapshot(entry)
            if snapshot is None:
                tried.append(f"Hugging Face cache entry {str(entry)!r} (not found)")
                continue
            return _pick(snapshot, selector, name)
    else:
        tried.append(f"a Hugging Face repo id 'org/name' ({name!r} is not one)")
    raise ValueError(
        f"model={name!r}: not found. Tried: " + "; ".join(tried)
        + ". Pass a Hugging Face model folder, a .gguf file, or a repo already in the local Hugging Face "
        "cache (nothing is downloaded); omit model to use the packaged default (Gemma 3 270M)."
    )


def _split(name: str) -> tuple[str, str | None]:
    """'org/repo:TAG' -> (org/repo, TAG); 'org/repo/file.gguf' -> (org/repo, file.gguf)."""
    if name.endswith(".gguf") and name.count("/") >= 2:
        org, repo, rest = name.split("/", 2)
        return f"{org}/{repo}", rest
    if ":" in name:
        repo, tag = name.rsplit(":", 1)
        return repo, tag
    return name, None


def _snapshot(entry: Path) -> Path | None:
    snaps = entry / "snapshots"
    if not snaps.is_dir():
        return None
    ref = entry / "refs" / "main"
    if ref.is_file():
        candidate = snaps / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _pick(snapshot: Path, selector: str | None, name: str) -> str:
    ggufs = sorted(p for p in snapshot.rglob("*.gguf") if p.is_file())
    if selector is None:
        if (snapshot / "config.json").is_file():
            return str(snapshot)
        if len(ggufs) == 1:
            return str(ggufs[0])
        if not ggufs:
            raise ValueError(f"model={name!r}: cached snapshot {str(snapshot)!r} has neither config.json nor a .gguf file")
        listing = ", ".join(p.name for p in ggufs)
        raise ValueError(f"model={name!r}: snapshot has several GGUF files ({listing}); pick one as {name}:<TAG>")
    matches = [p for p in ggufs if p.name == selector or selector.lower() in p.name.lower()]
    if len(matches) == 1:
        return str(matches[0])
    listing = ", ".join(p.name for p in ggufs) or "none"
    what = "no" if not matches else "several"
    raise ValueError(f"model={name!r}: {what} GGUF files in {str(snapshot)!r} match {selector!r} (available: {listing})")
