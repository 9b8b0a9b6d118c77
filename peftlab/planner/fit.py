"""The largest setting of a recipe that fits a memory budget.

Per-process batch sizes are tried from the target (``train.target_batch_size``, or batch_size x
grad_accum of a fixed recipe) down through its divisors, each without and then with gradient
checkpointing; gradient accumulation keeps the target. Then the evaluation batch is halved until the
evaluation pass fits too. Quantization is not changed here: it changes the method's numbers.
"""

from __future__ import annotations

from typing import Any

from .result import MIB, Plan
from ..errors import PeftlabError


def target_of(train: Any) -> int:
    return train.target_batch_size if train.batch_size == "auto" else train.batch_size * train.grad_accum


def candidates(target: int) -> list[int]:
    return [b for b in range(target, 0, -1) if target % b == 0]


def fit_plan(estimator: Any, budget: int) -> Plan:
    train = estimator.recipe.train
    target = target_of(train)
    checkpointing = [False, True] if estimator.supports_checkpointing() else [False]
    eval_sizes = [train.eval_batch_size]
    while eval_sizes[-1] > 1:
        eval_sizes.append(eval_sizes[-1] // 2)
    smallest = None
    for batch in candidates(target):
        for gc in checkpointing:
            plan = estimator.plan_for(batch, target // batch, gc, eval_sizes[-1], budget, timed=False)
            smallest = plan if smallest is None or plan.peak_bytes < smallest.peak_bytes else smallest
            if not plan.fits:
                continue
            for eval_batch in eval_sizes:
                chosen = estimator.plan_for(batch, target // batch, gc, eval_batch, budget, timed=False)
                if chosen.fits:
                    chosen = estimator.plan_for(batch, target // batch, gc, eval_batch, budget)
                    chosen.notes.insert(0, _chosen_note(chosen, target, budget))
                    return chosen
    raise PeftlabError(
        f"plan: nothing fits in {budget / MIB:,.0f} MiB: the smallest setting (batch {smallest.batch_size} x "
        f"{smallest.grad_accum} accum, eval batch {smallest.eval_batch_size}"
        f"{', gradient checkpointing' if smallest.gradient_checkpointing else ''}) needs "
        f"{smallest.peak_bytes / MIB:,.0f} MiB")


def _chosen_note(plan: Plan, target: int, budget: int) -> str:
    return (f"fit: batch {plan.batch_size} x {plan.grad_accum} accum (= {target} per step), eval batch "
            f"{plan.eval_batch_size}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}: "
            f"the largest that fits {budget / MIB:,.0f} MiB")
