"""Resolve a model name to a local path, offline: a folder, a .gguf file, or a repo in the HF cache.

Accepted names:
  /path/to/folder | /path/to/model.gguf      used as is
  gemma-3-270m                               the packaged default model, by the name it is served under
  org/name                                   HF cache snapshot (refs/main, else the newest snapshot);
                                             a snapshot holding only GGUF files resolves to its one .gguf
  org/name:TAG  or  org/name/file.gguf       pick one GGUF in that snapshot (TAG matches a file name,
                                             case-insensitively, e.g. ":Q4_K_M", Ollama-style)
Nothing is ever downloaded. The error for an unknown name lists every place that was tried.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenmill.model.default_model import DEFAULT_MODEL_NAME

# What every "model not found" message offers instead (the CLI prints it as the one line of a user error).
ALLOWED_MODELS = (f"pass a Hugging Face model folder, a .gguf file, a repo already in the local Hugging Face cache "
                  f"(nothing is downloaded), or {DEFAULT_MODEL_NAME} (or no model) for the packaged default model")


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
    if name == DEFAULT_MODEL_NAME:  # the served name of the default model means that model (as /v1/models shows)
        from tokenmill.model.default_model import default_model_path

        return default_model_path()
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
    raise ValueError(f"model={name!r}: not found. Tried: " + "; ".join(tried) + f". {ALLOWED_MODELS[0].upper()}"
                     f"{ALLOWED_MODELS[1:]}.")


def check_model(name: str) -> str:
    """Resolve `name` the way load_model will, without loading anything: the local path, or a ValueError
    that says what was wrong and what is allowed. Lets the CLI fail in one line before starting an engine."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"model={name!r}: is a file but not a .gguf; {ALLOWED_MODELS}")
    if not path.exists() and name != DEFAULT_MODEL_NAME and _looks_like_path(name):
        raise ValueError(f"model={name!r}: no such file or folder; {ALLOWED_MODELS}")
    return resolve_model(name)


def _looks_like_path(name: str) -> bool:
    # Same test as the loader's: such names are never looked up in the Hugging Face cache.
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.sep + os.sep in name


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
