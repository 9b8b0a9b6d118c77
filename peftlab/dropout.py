"""Dropout with masks drawn from random integer bits: the same distribution as ``nn.Dropout``, less
time and memory on CPUs.

torch's CPU dropout draws a float per element (``bernoulli_``, several times slower than integer
draws) and keeps that float mask for backward. Here a mask is one 16-bit draw per element compared
with ``p`` (so ``p`` is rounded to a multiple of 1/65536; on CPUs from numpy's PCG64, about twice as
fast as torch's CPU generator), made as one byte per element (1: keep),
kept for backward as bits on CPUs, and applied by multiplying with it (torch's CPU ``where`` and
``masked_fill_`` with a boolean mask take several times as long as a multiply by bytes).
:func:`install` routes a model's ``nn.Dropout`` layers through it on CPUs; LoRA's own dropout shares
:func:`keep_mask` (``methods/lora_inputs.py``). Masks, outputs and gradients live in reused CPU
memory (``cpu_buffers.py``): first touches of fresh pages cost more than the passes.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import numpy as np
import torch

from . import cpu_buffers

_LEVELS = 1 << 16  # keep-mask resolution: one 16-bit draw per element
_CPU_CHUNK_WORDS = 1 << 16  # 512 KiB of draws at a time: under glibc's mmap threshold, in cache
_CPU_CHUNK_ELEMENTS = 1 << 17  # a byte mask widened to float 512 KiB at a time: the same reasons


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """uint8 mask of ``shape``: 0 (drop) with probability p (to 1/65536), else 1; a function of ``seed``
    and of the device type (CPUs draw from numpy's PCG64, other devices from torch's generator)."""
    n = int(torch.Size(shape).numel())
    keep = cpu_buffers.empty(shape, torch.uint8, device)
    threshold = round(p * _LEVELS) - _LEVELS // 2  # a signed 16-bit draw at or above it: kept
    if torch.device(device).type == "cpu":
        _draw_on_cpu(keep.view(-1).numpy().view(np.bool_), threshold, seed)
        return keep
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)  # four 16-bit draws per word
    words.random_(-(2**63), 2**63 - 1, generator=gen)
    torch.ge(words.view(torch.int16)[:n], threshold, out=keep.view(-1).view(torch.bool))
    return keep


def _draw_on_cpu(flat: np.ndarray, threshold: int, seed: int) -> None:
    """``flat`` (bool) = 16-bit draws >= ``threshold``, from numpy's PCG64 seeded with ``seed``: its raw
    words come about twice as fast as those of torch's CPU generator (mt19937). A cache-sized chunk at
    a time (the same stream as one draw): no mask-sized scratch."""
    bits = np.random.PCG64(seed)
    step = 4 * _CPU_CHUNK_WORDS
    for start in range(0, flat.size, step):
        end = min(flat.size, start + step)
        draws = bits.random_raw((end - start + 3) // 4).view(np.int16)
        np.greater_equal(draws[: end - start], threshold, out=flat[start:end])


def masked(x: torch.Tensor, keep: torch.Tensor, gain: float = 1.0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * gain`` where ``keep`` is 1, +0.0 where it is 0, into ``out`` (contiguous; may be ``x``
    itself) or pooled memory. ``keep`` is :func:`keep_mask`'s byte mask or its :func:`packed` bits.

    ``addcmul`` (0 + gain * x * keep) gives the same bits as ``(x * gain).masked_fill_(~keep, 0)``.
    torch would widen the byte mask into a fresh float temporary of x's size; here it is widened a
    cache-sized chunk at a time on CPUs."""
    out = cpu_buffers.empty(x.shape, x.dtype, x.device) if out is None else out
    n, zero = x.numel(), x.new_zeros(())
    step = min(n, _CPU_CHUNK_ELEMENTS) if x.device.type == "cpu" else n
    flat_x, flat_out = x.reshape(-1), out.view(-1)
    scratch = torch.empty(step, dtype=x.dtype, device=x.device)
    for start in range(0, n, max(step, 1)):
        end = min(n, start + step)
        mask = scratch[: end - start].copy_(_keep_slice(keep, n, start, end))
        torch.addcmul(zero, flat_x[start:end], mask, value=gain, out=flat_out[start:end])
    return out


def packed(keep: torch.Tensor) -> torch.Tensor:
    """A byte mask as bits (an eighth of its bytes), to keep until backward, on CPUs; as it is on
    other devices and for 8 elements or fewer (so a mask is packed exactly when it is shorter than
    its tensor)."""
    if keep.device.type != "cpu" or keep.numel() <= 8:
        return keep
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy()))


def _keep_slice(keep: torch.Tensor, n: int, start: int, end: int) -> torch.Tensor:
    """Elements ``start:end`` of a mask for ``n`` elements, as bytes (``start`` a multiple of 8)."""
    if keep.numel() == n:
        return keep.reshape(-1)[start:end]
    return torch.from_numpy(np.unpackbits(keep.numpy()[start // 8: (end + 7) // 8], count=end - start))


def next_seed() -> int:
    """A mask seed from torch's default generator, so the run's seed fixes every mask."""
    return int(torch.randint(0, 2**62, (1,)).item())


class _Dropout(torch.autograd.Function):
    """``x`` with the elements ``keep`` drops zeroed and the rest scaled by ``1/(1-p)``; backward keeps
    only the mask, as bits on CPUs."""

    @staticmethod
    def forward(ctx, x, keep, gain: float):
        ctx.save_for_backward(packed(keep))
        ctx.gain = gain
        return masked(x, keep, gain)

    @staticmethod
    def backward(ctx, grad_out):
        (keep,) = ctx.saved_tensors
        return masked(grad_out, keep, ctx.gain), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)`` with the mask from :func:`keep_mask`."""
    if not training or p <= 0:
        return x
    if p >= 1:
        return x * 0.0
    keep = keep_mask(x.shape, p, next_seed(), x.device)
    return _Dropout.apply(x, keep, 1.0 / (1.0 - p))


def _forward(self: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return dropout(x, self.p, self.training)


def install(model: Any) -> int:
    """Route every ``nn.Dropout`` layer of ``model`` (its class exactly: not the other dropout
    variants) through :func:`dropout`; returns how many. The layers keep their class and ``p``."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    return len(layers)


def install_for_run(model: Any, enabled: bool, device: Any) -> int:
    """What a run does with ``train.cpu_fast_dropout``: :func:`install` on a CPU when enabled (GPUs
    keep torch's fused dropout); returns how many layers it routed."""
    return install(model) if enabled and torch.device(device).type == "cpu" else 0


def uninstall(model: Any) -> None:
    """Back to torch's own dropout on every layer."""
    for m in model.modules():
        if type(m) is torch.nn.Dropout and "forward" in vars(m):
            del m.forward
