"""Output folders peftlab owns: a marker file says peftlab made a folder, ``--overwrite`` replaces
only such folders (never one holding a source: the run being merged, the data, the recipe), and a
lock keeps a second writer out of a folder while a run holds it.

The lock is an OS file lock (``flock``) on ``.peftlab.lock`` inside the folder: the kernel releases
it when the process ends, however it ends, so a killed run never leaves a stale lock; the file
holds the PID of the holder for the message.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Optional, Sequence

from ._version import __version__
from .atomicio import write_json
from .errors import PeftlabError

MARKER = ".peftlab-output.json"
LOCK = ".peftlab.lock"
RUN_HEADER = "# resolved recipe (source:"  # first line of every run's recipe.yaml


def mark(folder: Path, kind: str) -> None:
    """Record that peftlab made ``folder`` (kind: run, merge, export, bench)."""
    write_json(folder / MARKER, {"made_by": "peftlab", "kind": kind, "version": __version__})


def made_by_peftlab(folder: Path) -> bool:
    """A folder with peftlab's marker, or one of the kinds peftlab wrote before markers existed."""
    if (folder / MARKER).is_file():
        return True
    recipe = folder / "recipe.yaml"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if recipe.is_file() and recipe.read_text(encoding="utf-8").startswith(RUN_HEADER):
            return True
    return (folder / "peftlab_merge.json").is_file() or (folder / "peftlab_export.json").is_file()


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != LOCK for p in folder.iterdir())


def check_output(path: Path, key: str, overwrite: bool, sources: Sequence[tuple[Path, str]] = (),
                 hint: str = "pass --overwrite to replace it") -> None:
    """Refuse an output folder whose writing could lose something: a symlink, a file, a folder under
    a file, a folder that is or contains a source (``sources``: (path, what it is)), one that holds
    files without ``overwrite``, or one that holds files peftlab did not make."""
    if path.is_symlink():
        raise PeftlabError(f"{key}: {path} is a symbolic link; give the folder itself")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PeftlabError(f"{key}: {parent} is a file, so {path} cannot be a folder under it")
    if path.exists() and not path.is_dir():
        raise PeftlabError(f"{key}: {path} is a file, not a folder")
    target = path.resolve()
    for src, what in sources:
        src_resolved = src.resolve()
        if src_resolved == target or target in src_resolved.parents:
            raise PeftlabError(f"{key}: {path} holds {what} {src}; choose a folder outside it")
    if not _holds_files(path):
        return
    if not overwrite:
        raise PeftlabError(f"{key}: {path} already holds files; {hint}")
    if not made_by_peftlab(path):
        raise PeftlabError(f"{key}: {path} was not made by peftlab (no {MARKER}); --overwrite replaces only "
                           "peftlab's own output folders: choose another folder, or empty this one yourself")


def clear(folder: Path) -> None:
    """Delete everything in ``folder`` but its lock (the caller holds it and checked the folder)."""
    import shutil

    for child in folder.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class FolderLock:
    """An exclusive lock on an output folder for the life of this process (or until release)."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.handle: Optional[IO[str]] = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock, as before
            return self
        handle = open(self.folder / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise PeftlabError(f"{self.key}: {self.folder} is in use by another peftlab process (pid {holder}); "
                               "wait for it to finish or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def probe(self) -> None:
        """Raise the in-use error if another process holds the lock now; take nothing."""
        if (self.folder / LOCK).is_file() and not self.folder.is_symlink():
            self.acquire()
            self.release()

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor releases the flock
            self.handle = None
