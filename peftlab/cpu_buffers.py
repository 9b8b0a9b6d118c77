"""Reused CPU memory for a training step's large temporaries (dropout masks, dropped copies, LoRA's
outputs and input gradients).

On CPUs torch has no caching allocator: a tensor over glibc's mmap threshold is mapped fresh and
every page faults on first touch, which costs more than the elementwise pass that fills it.
:func:`empty` hands out tensors over memory kept from earlier steps instead. A buffer is handed out
again only once no tensor uses it (each tensor owns a numpy view of its buffer; the pool keeps a weak
reference to that view), so a buffer still saved for backward or held by a caller is never
overwritten. A buffer handed out for less than its last user touched gives the rest of its pages back
to the OS (``madvise(MADV_DONTNEED)``), so the pool holds no more resident memory than its tensors
use. :func:`release` lets the free buffers go (before evaluation). Values are the same as with fresh
tensors; only where the memory comes from changes.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from .system import madvise_dontneed


_KEEP_SLACK = 1 << 18  # a tail under 256 KiB stays resident


class _Slot:
    __slots__ = ("array", "user", "touched")

    def __init__(self, nbytes: int) -> None:
        self.array = np.empty(nbytes, dtype=np.uint8)
        self.user: Optional[weakref.ref] = None  # the view the current tensor owns
        self.touched = 0  # bytes from the start that may be resident

    def lend(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` for a new tensor; pages past them that an earlier user touched go back."""
        if self.touched > nbytes + _KEEP_SLACK and _discard(self.array.ctypes.data + nbytes, self.touched - nbytes):
            self.touched = nbytes
        self.touched = max(self.touched, nbytes)
        view = self.array[:nbytes]
        self.user = weakref.ref(view)
        return view

    def free(self) -> bool:
        return self.user is None or self.user() is None


_slots: list[_Slot] = []
_lock = threading.Lock()  # threads serving different adapters share the pool


def empty(shape: "torch.Size | tuple", dtype: torch.dtype, device: "torch.device | str" = "cpu") -> torch.Tensor:
    """An uninitialised tensor; on a CPU over a pooled buffer (the smallest free one big enough, or a
    new one), elsewhere ``torch.empty``."""
    device = torch.device(device)
    numel = int(torch.Size(shape).numel())
    if device.type != "cpu" or numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = numel * dtype.itemsize
    with _lock:
        view = _take(nbytes).lend(nbytes)
    return torch.from_numpy(view).view(dtype).view(shape)


def _take(nbytes: int) -> _Slot:
    free = [s for s in _slots if s.free()]
    fitting = [s for s in free if s.array.nbytes >= nbytes]
    if fitting:
        return min(fitting, key=lambda s: s.array.nbytes)
    _forget(free)  # too small for this request: they would only hold memory
    slot = _Slot(nbytes)
    _slots.append(slot)
    return slot


def _discard(start: int, length: int) -> bool:
    """Give the whole pages in ``[start, start + length)`` back to the OS; False where it cannot."""
    page = mmap.PAGESIZE
    first, end = -(-start // page) * page, (start + length) // page * page
    return end > first and madvise_dontneed(first, end - first)


def release() -> int:
    """Let go of the free buffers (those in use stay until their tensors die); returns how many bytes."""
    with _lock:
        return _forget([s for s in _slots if s.free()])


def _forget(slots: list[_Slot]) -> int:
    """Drop ``slots`` from the pool (their memory goes with their last reference); returns their bytes."""
    _slots[:] = [s for s in _slots if s not in slots]
    return sum(s.array.nbytes for s in slots)


def pooled_bytes() -> int:
    """Bytes the pool holds, in use or free."""
    return sum(s.array.nbytes for s in _slots)
