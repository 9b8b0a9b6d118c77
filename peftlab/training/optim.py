"""Optimizer and learning-rate schedule of a recipe."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..recipe import Recipe
from ..runs import is_head_parameter


def make_optimizer(model: Any, trainable: dict[str, torch.nn.Parameter], recipe: Recipe, head_names: list[str]):
    cfg = recipe.train
    groups: dict[tuple, list] = {}
    for name, p in trainable.items():
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        lr = cfg.head_lr if (cfg.head_lr and is_head_parameter(name, head_names)) else cfg.lr
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items(), key=lambda kv: kv[0])
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, fused=cfg.fused_optimizer and fused_supported(trainable.values()))


def fused_supported(params: Any) -> bool:
    """True when torch has a fused AdamW kernel for every parameter (floating point, on a CPU, CUDA, ...
    device). The fused kernel updates every tensor in one pass, several times faster than torch's
    per-tensor loop over a full model's parameters on a CPU (benchmarks/optimizer_step.py); it is
    also what the transformers Trainer uses by default (``adamw_torch_fused``)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def make_scheduler(optimizer: Any, recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    cfg = recipe.train
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps), warmup
