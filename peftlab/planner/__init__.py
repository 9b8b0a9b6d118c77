"""Predict a recipe's peak memory and speed before it runs, and fit its batch to a memory budget.

``plan(recipe)`` measures, without loading the backbone's weights:

- the process before the model (imports, tokenizer, encoded data): this process's resident memory
  after doing exactly what a run does first;
- the weights: every parameter of the full-depth model on meta tensors, by dtype and bitsandbytes
  layout (``weights.py``);
- gradients, optimizer state, activations and the evaluation pass: every tensor alive during two
  training steps and one evaluation batch of shallow copies of the model with 1 and 2 layers, on the
  real longest batch, extrapolated to the full depth (``trace.py``); the step time likewise, on a
  batch of median length.

``fit.py`` searches batch size, gradient accumulation, checkpointing and evaluation batch size.
"""

from __future__ import annotations

from typing import Any, Optional

from .result import MIB, Component, Plan, parse_memory

__all__ = ["MIB", "Component", "Plan", "parse_memory", "plan"]


def plan(recipe: Any, *, device: Optional[str] = None, memory: Optional[Any] = None, fit: bool = False) -> Plan:
    """The recipe's plan on ``device`` (default: this machine's); with ``fit`` (implied by
    ``batch_size: auto``), the largest setting that fits ``memory`` (default: ``train.memory_budget``,
    else the memory available now)."""
    from .estimate import Estimator

    if recipe.train.batch_size == "auto":
        fit = True
        memory = memory if memory is not None else recipe.train.memory_budget
    estimator = Estimator(recipe, device)
    budget = parse_memory(memory) if memory is not None else None
    if not fit:
        return estimator.plan_for(recipe.train.batch_size_or(16), recipe.train.grad_accum,
                                  recipe.train.gradient_checkpointing, recipe.train.eval_batch_size, budget)
    from .fit import fit_plan

    return fit_plan(estimator, budget if budget is not None else estimator.available_bytes())
