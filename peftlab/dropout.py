"""Dropout with masks drawn from random integer bits: the same distribution as ``nn.Dropout``, less
time and memory on CPUs.

torch's CPU dropout draws a float per element (``bernoulli_``, several times slower than integer
draws) and keeps that float mask for backward. Here a mask is one 16-bit draw per element compared
with ``p`` (so ``p`` is rounded to a multiple of 1/65536) and backward keeps it as one byte per
element. :func:`install` routes a model's ``nn.Dropout`` layers through it on CPUs; LoRA's own
dropout shares :func:`drop_mask` (``methods/lora_fast.py``). Masks, outputs and gradients live in
reused CPU memory (``cpu_buffers.py``): first touches of fresh pages cost more than the passes.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from . import cpu_buffers

_LEVELS = 1 << 16  # keep-mask resolution: one 16-bit draw per element
_CPU_CHUNK_WORDS = 1 << 16  # 512 KiB of draws at a time: under glibc's mmap threshold, in cache


def drop_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Boolean mask of ``shape``, True (drop) with probability p (to 1/65536), a function of ``seed``."""
    n = int(torch.Size(shape).numel())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = (n + 3) // 4  # four 16-bit draws per word
    # on a CPU, drawn a cache-sized chunk at a time (the same stream as one draw): no mask-sized scratch
    chunk = min(words, _CPU_CHUNK_WORDS) if torch.device(device).type == "cpu" else words
    scratch = torch.empty(chunk, dtype=torch.int64, device=device)
    drop = cpu_buffers.empty(shape, torch.bool, device)
    flat, threshold = drop.view(-1), round(p * _LEVELS) - _LEVELS // 2
    for start in range(0, words, max(chunk, 1)):
        bits = scratch[: min(chunk, words - start)].random_(-(2**63), 2**63 - 1, generator=gen).view(torch.int16)
        part = flat[4 * start: 4 * start + bits.numel()]
        torch.lt(bits[: part.numel()], threshold, out=part)
    return drop


def masked(x: torch.Tensor, drop: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """``x`` with the elements of ``drop`` zeroed and the rest times ``gain``, in pooled memory."""
    out = cpu_buffers.empty(x.shape, x.dtype, x.device)
    if gain == 1.0:
        return torch.where(drop, x.new_zeros(()), x, out=out)
    return torch.mul(x, gain, out=out).masked_fill_(drop, 0.0)


def next_seed() -> int:
    """A mask seed from torch's default generator, so the run's seed fixes every mask."""
    return int(torch.randint(0, 2**62, (1,)).item())


class _Dropout(torch.autograd.Function):
    """``x`` with the elements of ``drop`` zeroed and the rest scaled by ``1/(1-p)``; backward keeps
    only the boolean mask."""

    @staticmethod
    def forward(ctx, x, drop, gain: float):
        ctx.save_for_backward(drop)
        ctx.gain = gain
        return masked(x, drop, gain)

    @staticmethod
    def backward(ctx, grad_out):
        (drop,) = ctx.saved_tensors
        return masked(grad_out, drop, ctx.gain), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)`` with the mask from :func:`drop_mask`."""
    if not training or p <= 0:
        return x
    if p >= 1:
        return x * 0.0
    drop = drop_mask(x.shape, p, next_seed(), x.device)
    return _Dropout.apply(x, drop, 1.0 / (1.0 - p))


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
