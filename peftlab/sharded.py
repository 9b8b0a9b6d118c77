"""Tensors split across processes by FSDP2 (torch DTensors), seen as whole tensors where peftlab
saves, loads and checks weights. Plain tensors pass through unchanged, so every caller works the
same with or without FSDP.

Gathering (:func:`whole`) is a collective: every process must call it, in the same order.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (all of it when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def whole(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """The whole of ``t``, detached, on the CPU; gathered from every process when sharded (a
    collective). ``keep=False``: take part in the gather but keep nothing (processes that do not write)."""
    full = t.detach().full_tensor() if is_sharded(t) else t.detach()
    return full.cpu().contiguous() if keep else None


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, present on every process) split the way ``like`` is; no communication."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def any_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The first name whose tensor holds nan/inf, looking at this process's part only."""
    for name, t in tensors:
        if not bool(torch.isfinite(local(t.detach())).all()):
            return name
    return None
