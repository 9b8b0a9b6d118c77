"""peftlab's training path for peft LoRA layers: the same function and the same weights, less work.

peft computes ``base(x) + B(A(dropout(x))) * scale`` with one ``nn.Dropout`` per adapted layer. On
CPUs that is the bottleneck (``bernoulli_`` is most of a LoRA step's time), and autograd keeps every
layer's dropped copy of its input plus the mask. This path, installed on the layers by
:func:`install`, computes the same expression with one autograd function per layer that

* draws the dropout mask from random integer bits (``peftlab/dropout.py``: several times faster
  than ``bernoulli_`` on CPUs), once per input tensor: layers that read the same tensor (q, k and v)
  share one mask and one dropped copy, as a layer with a fused qkv projection would
  (``lora_inputs.py``);
* on a frozen float ``nn.Linear`` runs the base matmul and the low-rank branch together and saves for
  backward only the dropped input (or, where the input is a GELU's, a LayerNorm's or a product's
  output, what autograd keeps anyway to compute it again), the mask (as bits on CPUs), the weights and the
  rank-``r`` activation (nothing of the frozen matmul's own);
* does the same on a frozen int8 base in training on a CPU, with the weight dequantized as
  bitsandbytes' own CPU training matmul does (which keeps the layer's input for backward);
* does the same on a frozen 4-bit base in training on a CPU, with the weight dequantized as
  bitsandbytes does (its own function runs the base apart from the branch: more output-sized
  temporaries);
* evaluates a frozen int8 base on a CPU with bitsandbytes' own inference ops, a block of rows at a
  time (its CPU kernels make several temporaries the size of the whole output);
* on other bases (GPUs' quantized layers, 4-bit in evaluation) leaves the base layer to its own
  forward and backward.

The parameters stay peft's ``lora_A`` / ``lora_B`` modules, so saving, loading, merging and peft's
parameter counts are unchanged. Layers this path does not cover (DoRA, a LoRA bias, several active
adapters, merged or disabled adapters, mixed-adapter batches, autocast) run peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch

from .. import cpu_buffers
from ..dropout import masked
from .lora_inputs import SharedDropout, layer_norm_eps


_INT8_BLOCK_ELEMENTS = 1 << 20  # int8 evaluation: rows of at most 4 MiB of float output at a time


class _LoraLinear(torch.autograd.Function):
    """``x @ W^T + bias + (dropout(x) @ A^T) @ B^T * scale`` for a frozen ``W``; with ``weight=None``
    the LoRA branch alone (the base layer then runs its own forward, e.g. 4-bit). ``W`` is ``weight``,
    or, with ``row_scale``, bitsandbytes' int8 rows dequantized as its CPU training matmul does, again
    in backward. ``dropped``, ``keep`` and ``again`` come from :class:`SharedDropout`; backward keeps
    the mask, the weights, the rank-r activation h and ``dropped`` (or, with ``again``, only what
    computes it again), nothing of size x for the frozen matmul."""

    @staticmethod
    def forward(ctx, x, dropped, keep, weight, row_scale, bias, weight_a, weight_b, gain: float, again):
        flat = x.reshape(-1, x.shape[-1])
        h = dropped.reshape(flat.shape) @ weight_a.t()
        out = cpu_buffers.empty((flat.shape[0], weight_b.shape[0]), x.dtype, x.device)
        if weight is None:  # the branch alone: scale the rank-r activation, not the output
            torch.mm(h * gain, weight_b.t(), out=out)
        else:
            dense = _dense(weight, row_scale, x.dtype)
            if bias is None:
                torch.mm(flat, dense.t(), out=out)
            else:
                torch.addmm(bias, flat, dense.t(), out=out)
            out.addmm_(h, weight_b.t(), alpha=gain)
        sources = (dropped,) if again is None else again.tensors  # saved for autograd's in-place checks
        ctx.save_for_backward(keep, weight, row_scale, weight_a, weight_b, h, *sources)
        ctx.gain, ctx.again, ctx.x_shape = gain, again, x.shape
        return out.view(*x.shape[:-1], weight_b.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        keep, weight, row_scale, weight_a, weight_b, h, *sources = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = (g @ weight_b).mul_(ctx.gain)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[6]:
            dropped = sources[0] if ctx.again is None else ctx.again.dropped(keep)
            grad_a = grad_h.t() @ dropped.reshape(-1, dropped.shape[-1])
        if ctx.again is not None:
            ctx.again.done()
        if ctx.needs_input_grad[7]:
            grad_b = (g.t() @ h).mul_(ctx.gain)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_h, weight_a, out=cpu_buffers.empty((g.shape[0], weight_a.shape[1]), g.dtype, g.device))
            if keep is not None:  # a multiply by the byte mask: several times faster than masked_fill_ on CPUs
                masked(grad_x, keep, out=grad_x)
            if weight is not None:
                grad_x.addmm_(g, _dense(weight, row_scale, g.dtype))
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, None, None, None, grad_a, grad_b, None, None


def _dense(weight: torch.Tensor, row_scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The float weight: ``weight`` itself, int8 rows times their absmax / 127 (bitsandbytes'
    ``MatMul8bitFp`` expression), or a 4-bit weight dequantized (what ``MatMul4Bit`` computes with)."""
    if row_scale is not None:
        return weight.to(dtype).mul_(row_scale.unsqueeze(1).mul(1.0 / 127.0))
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight, state).to(dtype)


def _fast_applies(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
    """The single active adapter this path computes, or None when peft's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled():
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    return name


def _fast_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fast_applies(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    gain = float(self.scaling[name]) / (1.0 - p)  # dropout's 1/(1-p) folded into the rank-r product
    shared = self._peftlab_dropout
    if _frozen_float(base, x, weight_a):  # one function for the base matmul and the branch
        dropped, keep, again = shared(x, p)
        return _LoraLinear.apply(x, dropped, keep, base.weight, None, base.bias, weight_a, weight_b, gain, again)
    quantized = _frozen_int8_training(base, x, weight_a) or _frozen_4bit_training(base, x, weight_a)
    if quantized is not None:  # the same, on int8 rows (bitsandbytes' own function would keep x) or 4-bit
        dropped, keep, again = shared(x, p)
        return _LoraLinear.apply(x, dropped, keep, *quantized, weight_a, weight_b, gain, again)
    result = _int8_inference(base, x) if _frozen_int8_eval(base, x) else self.base_layer(x)
    x = x.to(weight_a.dtype)
    dropped, keep, again = shared(x, p)
    branch = _LoraLinear.apply(x, dropped, keep, None, None, None, weight_a, weight_b, gain, again)
    return result + branch.to(result.dtype)


def _frozen_float(base: Any, x: torch.Tensor, weight_a: torch.Tensor) -> bool:
    """A plain float ``nn.Linear`` with a frozen weight (and bias), in the adapter's dtype."""
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    return base.weight.dtype == x.dtype == weight_a.dtype


def _frozen_int8_training(base: Any, x: torch.Tensor, weight_a: torch.Tensor) -> Optional[tuple]:
    """(int8 rows, their absmax, bias) of a frozen bitsandbytes ``Linear8bitLt`` in training on a CPU
    (or XPU), where bitsandbytes computes ``x @ dequantized(W)^T`` (``MatMul8bitFp``) and keeps ``x``
    for backward although ``W`` is frozen; None elsewhere (its int8 kernels, GPUs, evaluation)."""
    if type(base).__name__ != "Linear8bitLt" or not base.training or x.device.type not in ("cpu", "xpu"):
        return None
    state = base.state
    if state.has_fp16_weights or base.weight.requires_grad or x.dtype != weight_a.dtype:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    _int8_ready(base, x.dtype)
    if state.CB is None or state.SCB is None:
        return None
    state.is_training = True
    return state.CB, state.SCB, base.bias


def _int8_ready(base: Any, dtype: torch.dtype) -> None:
    """What bitsandbytes' ``Linear8bitLt`` forward does first: move the int8 rows into the layer's
    state and cast the bias to the input's dtype."""
    if base.weight.CB is not None:
        base.init_8bit_state()
    if base.bias is not None and base.bias.dtype != dtype:
        base.bias.data = base.bias.data.to(dtype)


def _frozen_4bit_training(base: Any, x: torch.Tensor, weight_a: torch.Tensor) -> Optional[tuple]:
    """(4-bit weight, None, bias) of a frozen bitsandbytes ``Linear4bit`` in training on a CPU, computing
    in the adapter's dtype, in bitsandbytes' standard layout; None elsewhere."""
    if type(base).__name__ != "Linear4bit" or not base.training or x.device.type != "cpu":
        return None
    weight, bias = base.weight, base.bias
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or weight.requires_grad:
        return None
    if base.compute_dtype not in (None, x.dtype) or x.dtype != weight_a.dtype:
        return None
    if bias is not None and (bias.requires_grad or bias.dtype != x.dtype):
        return None
    return weight, None, bias


def _frozen_int8_eval(base: Any, x: torch.Tensor) -> bool:
    """A frozen bitsandbytes ``Linear8bitLt`` evaluated on a CPU without gradients."""
    return (type(base).__name__ == "Linear8bitLt" and not base.training and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not base.state.has_fp16_weights and x.dim() >= 2)


def _int8_inference(base: Any, x: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' ``MatMul8bitLt`` computes for ``base(x)`` without gradients (rows quantized
    to int8 by their absmax, with the batch's outlier columns, those holding a value of at least the
    threshold, computed in float), done a block of rows at a time into one output. The outlier
    columns are found over the whole input first, as bitsandbytes does."""
    from bitsandbytes.functional import int8_vectorwise_quant

    _int8_ready(base, x.dtype)
    state, bias = base.state, base.bias
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty((flat.shape[0], state.CB.shape[0]), dtype=x.dtype, device=x.device)
    step = max(1, _INT8_BLOCK_ELEMENTS // max(out.shape[1], flat.shape[1]))
    cols = _outlier_columns(flat, state.threshold, step)
    for i in range(0, flat.shape[0], step):
        rows = flat[i:i + step]
        quantized, scale, _ = int8_vectorwise_quant(rows.to(torch.float16), threshold=state.threshold)
        if cols is None:
            out[i:i + step] = torch.ops.bitsandbytes.int8_scaled_mm(quantized, state.CB, scale, state.SCB,
                                                                    bias=bias, dtype=x.dtype)
            continue
        quantized[:, cols] = 0  # the batch's outlier columns, not only this block's
        out[i:i + step] = torch.ops.bitsandbytes.int8_mixed_scaled_mm(rows, quantized, state.CB, scale, state.SCB,
                                                                      cols, bias)[0]
    return out.view(*x.shape[:-1], out.shape[1])


def _outlier_columns(flat: torch.Tensor, threshold: float, step: int) -> Optional[torch.Tensor]:
    """Indices of the columns of ``flat`` (as float16) holding a value of magnitude >= ``threshold``;
    None without a threshold."""
    if threshold <= 0.0:
        return None
    hit = torch.zeros(flat.shape[1], dtype=torch.bool, device=flat.device)
    for i in range(0, flat.shape[0], step):
        hit |= (flat[i:i + step].to(torch.float16).abs() >= threshold).any(dim=0)
    return torch.argwhere(hit).view(-1)


def lora_layers(model: Any) -> list[Any]:
    """peft's LoRA layers on linear (float or bitsandbytes) base layers."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
            and _is_linear_base(m.get_base_layer())]


def _is_linear_base(base: Any) -> bool:
    return isinstance(base, torch.nn.Linear) or type(base).__name__ in ("Linear8bitLt", "Linear4bit")


def install(model: Any, recompute: bool = True) -> int:
    """Route the forward of every LoRA layer on a linear base through this path; returns how many.
    ``recompute``: backward computes an input again where it can (``lora_inputs.py``) instead of
    keeping a copy."""
    dropout = SharedDropout(layer_norm_eps(model), recompute)
    layers = lora_layers(model)
    for layer in layers:
        layer._peftlab_dropout = dropout
        layer.forward = types.MethodType(_fast_forward, layer)
    return len(layers)


def uninstall(model: Any) -> None:
    """Back to peft's own forward on every layer."""
    for layer in lora_layers(model):
        if "forward" in vars(layer):
            del layer.forward
        vars(layer).pop("_peftlab_dropout", None)
