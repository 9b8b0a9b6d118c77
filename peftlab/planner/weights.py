"""Weight memory of the full-depth model, by dtype and quantization, counted on its empty (meta) modules.

bitsandbytes layouts (0.4x-0.5x): a 4-bit weight packs two values per byte with one absmax per block
of 64 values (float32, or with double quantization one byte plus a float32 per 256 blocks); an
LLM.int8 weight is one byte per value plus one float32 scale per output row. Modules a quantized load
keeps in full precision (heads, embeddings, norms, ``backbone.unquantized_modules``) and the method's
trainable parameters stay in their float dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BLOCK_4BIT = 64
DOUBLE_QUANT_GROUP = 256


@dataclass
class WeightCount:
    frozen_bytes: int
    trainable_bytes: int
    trainable_params: int
    total_params: int
    quantized_params: int


def quantized_bytes(numel: int, rows: int, quantization: str, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one quantized weight of ``numel`` values and ``rows`` output rows."""
    if quantization == "int8":
        return numel + 4 * rows
    blocks = -(-numel // BLOCK_4BIT)
    packed = -(-numel // 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // DOUBLE_QUANT_GROUP) + 4  # uint8 absmax, float32 per group, offset


def quantizable_weights(bare: Any, quantization: str, skip: list[str]) -> set[int]:
    """ids of the bare model's weights a quantized load replaces (transformers' own skip rule)."""
    if quantization == "none":
        return set()
    from transformers.quantizers.quantizers_utils import should_convert_module

    return {id(m.weight) for name, m in bare.named_modules()
            if isinstance(m, torch.nn.Linear) and should_convert_module(name, skip)}


def count_weights(model: Any, trainable: dict[str, Any], quantized: set[int], quantization: str,
                  double_quant: bool, dtype: torch.dtype) -> WeightCount:
    """``model``: the method applied on meta tensors; ``trainable``: its trainable parameters;
    ``quantized``: ids of the weights a quantized load stores in ``quantization``."""
    trainable_ids = {id(p) for p in trainable.values()}
    elem = torch.empty((), dtype=dtype).element_size()
    frozen = trained = n_trainable = total = n_quantized = 0
    params = {id(p): p for p in model.parameters()}  # tied weights once
    for key, p in params.items():
        total += p.numel()
        if key in trainable_ids:
            trained += p.numel() * elem
            n_trainable += p.numel()
        elif key in quantized:
            frozen += quantized_bytes(p.numel(), p.shape[0], quantization, double_quant)
            n_quantized += p.numel()
        else:
            frozen += p.numel() * elem
    frozen += sum(b.numel() * b.element_size() for b in {id(b): b for b in model.buffers()}.values())
    return WeightCount(frozen, trained, n_trainable, total, n_quantized)
