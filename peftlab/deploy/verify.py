"""Checking a deployable checkpoint against the run it came from: Δlogit, agreement, the task metric.

Four kinds of merge, each with its own default thresholds (``THRESHOLDS``):

* ``exact``: the output dtype is the dtype the run computed in, no quantization: the merged model must
  reproduce the run (max |Δlogit| <= 1e-4, 100% agreement);
* ``dtype_change``: e.g. a float32 run written as bfloat16/float16: rounding the weights moves the
  logits a little (max |Δlogit| <= 0.5 for bfloat16, 0.1 for float16; agreement >= 99%);
* ``dequantized``: LoRA trained on an int8/nf4/fp4 backbone, ``quantized_base="dequantize"`` (default):
  the quantized weights the adapter was trained against are dequantized to full precision and the
  adapter merged into them: the run's function up to the compute dtype; agreement >= 99% is enforced;
* ``from_quantized``: ``quantized_base="reload"``: the original full-precision weights are reloaded
  instead, which changes the model; the gap is reported and only agreement >= 90% is enforced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ..errors import VerificationError
from ..util import is_bnb_model, scalar_items

QUANTIZED_BASE_MODES = ("dequantize", "reload")  # the first is the default


@dataclass(frozen=True)
class Thresholds:
    """A merge passes when max |Δlogit| <= ``atol`` (None: reported only) and agreement >= ``min_agreement``."""

    atol: Optional[float]
    min_agreement: float
    note: str


THRESHOLDS: dict[str, Thresholds] = {
    "exact": Thresholds(1e-4, 1.0, "same dtype, unquantized: the merged model must reproduce the run"),
    "dtype_change:bfloat16": Thresholds(0.5, 0.99, "weights rounded to bfloat16 (8 significant bits)"),
    "dtype_change:float16": Thresholds(0.1, 0.99, "weights rounded to float16 (11 significant bits)"),
    "dtype_change:float32": Thresholds(0.5, 0.99, "a low-precision run written as float32"),
    "dequantized": Thresholds(
        None, 0.99,
        "the quantized weights the adapter was trained against, dequantized to full precision, with the "
        "adapter merged: the run's function up to the compute dtype; the gap is measured and reported",
    ),
    "from_quantized": Thresholds(
        None, 0.90,
        "the adapter was trained against quantized weights and is merged into full-precision ones: "
        "the gap is measured and reported; only prediction agreement is enforced",
    ),
}


def merge_kind(quantization: str, run_dtype: str, out_dtype: str, quantized_base: str = QUANTIZED_BASE_MODES[0]) -> str:
    if quantization != "none":
        return "dequantized" if quantized_base == "dequantize" else "from_quantized"
    if out_dtype != run_dtype:
        return f"dtype_change:{out_dtype}"
    return "exact"


TARGET_KEYS = ("labels", "start_positions", "end_positions")  # training targets, not inputs


def _model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if not k.startswith("_") and k not in TARGET_KEYS}


@torch.no_grad()
def compare_models(reference: Any, candidate: Any, task: Any, tokenizer: Any, examples: list[dict],
                   device: torch.device, batch_size: int = 32) -> dict:
    """Δlogit statistics and prediction agreement of two models on ``examples``.

    Δ is taken over every non-padding position (token tasks) or example (sequence tasks); agreement
    over the positions the task predicts (first sub-tokens for NER, one per text for classification,
    the answer's start and end token for question answering), for each of ``task.output_logits``.
    """

    encoded = task.encode(examples, tokenizer, "validation")
    dl = DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=task.collator(tokenizer))
    reference.eval()
    candidate.eval()
    max_abs, sum_abs, n_values, agree, n_pred = 0.0, 0.0, 0, 0, 0
    for batch in dl:
        inputs = _model_inputs(batch, device)
        ref_out, new_out = task.output_logits(reference(**inputs)), task.output_logits(candidate(**inputs))
        for name, a in ref_out.items():
            diff, same, n = _compare_logits(name, a.float(), new_out[name].float(), inputs, batch)
            agree, n_pred = agree + same, n_pred + n
            if not torch.isfinite(diff).all():
                max_abs = math.inf
            elif diff.numel():
                max_abs = max(max_abs, float(diff.max()))
            sum_abs += float(diff.double().sum())
            n_values += diff.numel()
    return {
        "examples": len(examples),
        "logit_values": n_values,
        "predictions": n_pred,
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": sum_abs / n_values if n_values else 0.0,
        "agreement": agree / n_pred if n_pred else 1.0,
    }


def _compare_logits(name: str, a: torch.Tensor, b: torch.Tensor, inputs: dict, batch: dict) -> tuple:
    """|a - b| over the compared values, and how many argmax predictions agree out of how many."""
    if a.shape != b.shape:
        raise VerificationError(
            f"verification: {name} of shape {tuple(b.shape)} from the merged model, {tuple(a.shape)} from the run")
    if a.dim() != 3:  # one prediction per example (over classes, or over positions for span heads)
        return (a - b).abs(), int((a.argmax(-1) == b.argmax(-1)).sum()), a.shape[0]
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(
        a.shape[:2], dtype=torch.bool, device=a.device)
    labels = batch.get("labels")
    pred_mask = (labels != -100).to(a.device) if isinstance(labels, torch.Tensor) and tuple(
        labels.shape) == tuple(a.shape[:2]) else mask
    return (a - b).abs()[mask], int((a.argmax(-1) == b.argmax(-1))[pred_mask].sum()), int(pred_mask.sum())


def task_metrics(model: Any, task: Any, tokenizer: Any, examples: list[dict], batch_size: int = 32) -> dict:
    """The task's own evaluator (``task.evaluate``) on ``examples``; scalar metrics only."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    encoded = task.encode(examples, tokenizer, "eval").sorted_by_length()
    dl = accelerator.prepare(DataLoader(encoded, batch_size=batch_size, shuffle=False,
                                        collate_fn=task.collator(tokenizer)))
    if not is_bnb_model(model):
        model.to(accelerator.device)
    metrics = task.evaluate(model, dl, accelerator, encoded)
    return scalar_items(metrics)


def threshold_failures(stats: dict, thresholds: dict) -> list[str]:
    failures = []
    atol = thresholds["max_abs_logit_diff"]
    if atol is not None and not stats["max_abs_logit_diff"] <= atol:
        failures.append(f"max |Δlogit| {stats['max_abs_logit_diff']:.3g} > tolerance {atol:g}")
    if stats["agreement"] < thresholds["min_agreement"]:
        failures.append(
            f"prediction agreement {100 * stats['agreement']:.2f}% < {100 * thresholds['min_agreement']:.2f}%"
        )
    return failures
