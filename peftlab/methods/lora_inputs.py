"""What peftlab's LoRA path keeps of an adapted layer's input: its dropout, drawn once per input
tensor, and for backward either the dropped copy or nothing the size of the input.

A LoRA branch needs its dropped input again in backward, for A's gradient. When that input is the
output of a GELU, a LayerNorm or a product of two tensors, autograd already keeps what made it
(the GELU's input; the LayerNorm's input and affine weights; both factors) for that node's own
backward. The branch then keeps references to those instead of a copy and computes the input
again, bit for bit, in backward: with LoRA on every linear layer of a BERT that is every adapted
layer's input copy gone from the saved activations, for one extra GELU or LayerNorm pass a layer.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional

import torch

from .. import cpu_buffers
from ..dropout import keep_mask, masked, next_seed, packed


class Recompute:
    """``fn(*tensors, out=buffer)`` writes the input again, bit for bit, into a buffer of the shape
    and dtype of ``tensors[0]``; ``tensors`` are kept by autograd anyway. The layers that read the
    input (``users``: q, k and v) share one copy in backward; the last of them lets it go."""

    __slots__ = ("fn", "tensors", "users", "_copy")

    def __init__(self, fn: Callable[..., Any], tensors: tuple) -> None:
        self.fn, self.tensors, self.users = fn, tensors, 0
        self._copy: Optional[torch.Tensor] = None

    def dropped(self, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """The input with the dropout mask ``keep`` applied (no gain), computed once for its users."""
        if self._copy is None:
            self._copy = compute_again(self, keep)
        return self._copy

    def done(self) -> None:
        """One user's backward is over; after the last, nothing of the input stays referenced here."""
        self.users -= 1
        if self.users <= 0:
            self._copy, self.tensors = None, ()


def _gelu(x: torch.Tensor, *, approximate: str, out: torch.Tensor) -> None:
    torch.ops.aten.gelu.out(x, approximate=approximate, out=out)


def _mul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> None:
    torch.mul(a, b, out=out)


def _layer_norm(x: torch.Tensor, weight: Any, bias: Any, *, shape: tuple, eps: float, out: torch.Tensor) -> None:
    stats = x.shape[: x.dim() - len(shape)] + (1,) * len(shape)  # the mean and 1/std it also writes
    torch.ops.aten.native_layer_norm.out(x, list(shape), weight, bias, eps, out0=out,
                                         out1=x.new_empty(stats), out2=x.new_empty(stats))


def _saved_tensor_hooks_active() -> bool:
    """True under ``saved_tensors_hooks`` (non-reentrant checkpointing, offloading): the saved
    tensors are then theirs to pack, so nothing is recomputed from them."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def recompute_for(x: torch.Tensor, eps_by_weight: dict[int, float]) -> Optional[Recompute]:
    """How to compute ``x`` again from what autograd keeps for the node that made it, or None.

    ``eps_by_weight`` maps ``id`` of each LayerNorm weight to its eps (the node does not keep it)."""
    node = x.grad_fn
    if node is None or x.output_nr != 0 or _saved_tensor_hooks_active():
        return None
    kind = type(node).__name__
    try:
        if kind == "GeluBackward0":
            return Recompute(functools.partial(_gelu, approximate=node._saved_approximate), (node._saved_self,))
        if kind == "MulBackward0":
            a, b = node._saved_self, node._saved_other
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape == x.shape
                    and a.dtype == b.dtype == x.dtype):
                return Recompute(_mul, (a, b))
        if kind == "NativeLayerNormBackward0" and node._saved_weight is not None:
            eps = eps_by_weight.get(id(node._saved_weight))
            if eps is not None:
                fn = functools.partial(_layer_norm, shape=tuple(node._saved_normalized_shape), eps=eps)
                return Recompute(fn, (node._saved_input, node._saved_weight, node._saved_bias))
    except RuntimeError:  # a saved tensor was released or modified in place
        return None
    return None


def layer_norm_eps(model: Any) -> dict[int, float]:
    """``id`` of every ``nn.LayerNorm`` weight in ``model`` -> its eps (ids survive ``model.to``)."""
    return {id(m.weight): float(m.eps) for m in model.modules()
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None}


class SharedDropout:
    """LoRA dropout once per input tensor: the layers that read the same tensor (q, k and v) share
    one mask and one dropped copy, as a layer with a fused qkv projection would (and in backward one
    recomputed copy). The mask is drawn from torch's default generator, so the run's seed fixes it."""

    def __init__(self, eps_by_weight: dict[int, float], recompute: bool = True) -> None:
        self.eps_by_weight, self.recompute = eps_by_weight, recompute
        self._input: Optional[weakref.ref] = None
        self._key: tuple = ()
        self._out: Optional[tuple] = None

    def __call__(self, x: torch.Tensor, p: float) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[Recompute]]:
        """(dropped x without the 1/(1-p) gain, its byte keep-mask or None for p = 0, how backward
        can compute x again or None)."""
        if p <= 0 and not torch.is_grad_enabled():  # evaluation: nothing of the last step stays referenced
            self._input, self._out = None, None
            return x, None, None
        if not self._cached(x, p):
            again = recompute_for(x, self.eps_by_weight) if self.recompute and torch.is_grad_enabled() else None
            if p <= 0:
                self._out = (x, None, again)
            else:
                with torch.no_grad():
                    keep = keep_mask(x.shape, p, next_seed(), x.device)
                    self._out = (masked(x, keep), packed(keep), again)  # kept until backward: as bits
            self._input, self._key = weakref.ref(x), (x._version, p)
        if self._out[2] is not None:
            self._out[2].users += 1
        return self._out

    def _cached(self, x: torch.Tensor, p: float) -> bool:
        """The last input again, unchanged, and its recompute (if any) not yet let go by backward."""
        if self._out is None or self._input is None or self._input() is not x or self._key != (x._version, p):
            return False
        return self._out[2] is None or bool(self._out[2].tensors)


def compute_again(again: Recompute, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``again.fn(*again.tensors)`` with the dropout mask ``keep`` applied (no gain), without
    autograd, in pooled memory."""
    first = again.tensors[0]
    x = cpu_buffers.empty(first.shape, first.dtype, first.device)
    with torch.no_grad():
        again.fn(*again.tensors, out=x)
        return x if keep is None else masked(x, keep, out=x)
