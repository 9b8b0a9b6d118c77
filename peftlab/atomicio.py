"""Atomic file and folder writes.

Everything that marks a result as done (a checkpoint, the best model, metrics.json, a merged
checkpoint, a bench record) is written under a temporary name in the same folder and renamed into
place, so a process killed at any moment never leaves something that looks complete but is not.

Setting ``PEFTLAB_WRITE_AUDIT=DIR`` appends one line per write to ``DIR/writes-rank<R>.log``
(used by the multi-process tests to prove that only rank 0 writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_PREFIX = ".tmp-"


def _audit(path: Path) -> None:
    audit_dir = os.environ.get("PEFTLAB_WRITE_AUDIT")
    if not audit_dir:
        return
    rank = os.environ.get("RANK", "0")
    Path(audit_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(audit_dir) / f"writes-rank{rank}.log", "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\t{path}\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _audit(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.{os.getpid()}-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final`` in one rename.

    On any exception the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _audit(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}.{os.getpid()}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        mask = _umask()
        for root, dirs, files in os.walk(tmp):
            for name in dirs:  # modes from the umask, as for every other file (safetensors writes 0600)
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            trash = final.parent / f"{TMP_PREFIX}{final.name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writer_alive(name: str) -> bool:
    """Whether the process that made temporary ``name`` (``.tmp-X.<pid>-…`` / ``.tmp-X.old-<pid>``)
    still runs; names without a PID are from before PIDs were recorded: stale."""
    m = re.search(r"\.(?:old-)?(\d+)(?:-[^.]*)?$", name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> None:
    """Delete leftovers of interrupted atomic writes directly inside ``folder`` (only those of
    ``name`` when given), unless the process writing them still runs."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    prefix = TMP_PREFIX if name is None else f"{TMP_PREFIX}{name}."
    for child in folder.iterdir():
        if child.name.startswith(prefix) and not _writer_alive(child.name):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
