"""Deployable checkpoints: ``peftlab merge`` (verified) and ``peftlab export``.

``merge(run_dir, out)`` folds a finished run's method into the backbone's weights and writes a
checkpoint that plain ``transformers`` loads with ``AutoModelFor<Task>.from_pretrained(out)`` (no
peft, no peftlab): ``model.safetensors``, ``config.json`` with ``id2label``/``label2id``, the
tokenizer files, ``verify.json``, ``peftlab_merge.json`` (task and resolved recipe, read by
``peftlab predict``) and a model card ``README.md``.

Every merge is verified before anything becomes visible: the checkpoint is written into a temporary
folder, loaded back with plain transformers, and run next to the unmerged model *exactly as it was
trained* (``load_run``: base + adapter, quantized if it was) on N validation examples. max |Δlogit|,
mean |Δlogit| and prediction agreement go into ``verify.json`` and the model card; the task metric of
both models on the validation split is reported too. Below the thresholds the merge raises
:class:`~peftlab.errors.VerificationError` (CLI exit 4) and the output folder is never created
(:func:`peftlab.atomicio.atomic_dir`).

Four kinds of merge, each with its own default thresholds (``THRESHOLDS``):

* ``exact``: the output dtype is the dtype the run computed in, no quantization: the merged model must
  reproduce the run (max |Δlogit| <= 1e-4, 100% agreement);
* ``dtype_change``: e.g. a float32 run written as bfloat16/float16: rounding the weights moves the
  logits a little (max |Δlogit| <= 0.5 for bfloat16, 0.1 for float16; agreement >= 99%);
* ``dequantized``: LoRA trained on an int8/nf4/fp4 backbone, ``quantized_base="dequantize"`` (default):
  the quantized weights the adapter was trained against are dequantized to full precision, the adapter
  is loaded onto them and merged. The merged model is the trained one up to the compute dtype: the
  gap is measured and reported and agreement >= 99% is enforced (on MiniLM nf4: max |Δlogit| 8e-6);
* ``from_quantized``: the same with ``quantized_base="reload"``: the original full-precision weights
  are reloaded instead. The adapter was trained against the quantized weights, so this changes the
  model: the gap is measured and reported (Δlogit statistics, the metric of both models) and only
  agreement >= 90% is enforced (on MiniLM nf4: max |Δlogit| 1.98, agreement 98.96%).

Methods that cannot be merged (``can_merge = False``) are refused with the list of those that can;
``export(run_dir, out)`` packages any run instead (adapter weights + config + a reference to the base
backbone) as a minimal run folder that ``load_run`` and ``peftlab predict`` read.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from . import __version__
from .atomicio import atomic_dir, write_json, write_text
from .errors import PeftlabError, VerificationError

PathLike = Union[str, Path]

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_VERIFY_EXAMPLES = 200
QUANTIZED_BASE_MODES = ("dequantize", "reload")  # the first is the default
EVAL_SPLITS = ("validation", "test", "none")
VERIFY_FILE = "verify.json"
EXPORT_FILE = "peftlab_export.json"
EXPORT_FORMAT = "peftlab-export/1"
MERGE_FILE = "peftlab_merge.json"  # task + resolved recipe of a merged checkpoint (predict reads it)
MERGE_FORMAT = "peftlab-merge/1"

PIPELINE_TAGS = {
    "token_classification": "token-classification",
    "sequence_classification": "text-classification",
    "causal_lm": "text-generation",
}


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

# Test hook: called with the merged model right before it is saved (tests corrupt a tensor here).
_before_save_hooks: list[Callable[[Any], None]] = []


# ------------------------------------------------------------------------------------- helpers


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_out(out: Path, overwrite: bool, sources: Sequence[Path]) -> None:
    for src in sources:
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise PeftlabError(f"--out: {out} is inside the run folder {src}; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PeftlabError(f"--out: {out} already holds files; pass --overwrite to replace it")


def _recipe_and_method(run_dir: Path):
    from .methods import build_method
    from .recipe import load_recipe
    from .runs import MODEL_DIR

    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / MODEL_DIR).is_dir():
        raise PeftlabError(f"{run_dir}: not a finished peftlab run (needs recipe.yaml and model/)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    return recipe, build_method(recipe)


def _refuse_unmergeable(run_dir: Path, method: Any) -> None:
    if method.can_merge:
        return
    try:
        method.merge(None)  # the base class raises the refusal that names the methods that can
    except PeftlabError as exc:
        raise PeftlabError(f"{run_dir / 'recipe.yaml'}: method.name: {exc}") from None
    raise PeftlabError(
        f"{run_dir / 'recipe.yaml'}: method.name: method '{method.name}' cannot be merged; use `peftlab export`"
    )


def merge_kind(quantization: str, run_dtype: str, out_dtype: str, quantized_base: str = QUANTIZED_BASE_MODES[0]) -> str:
    if quantization != "none":
        return "dequantized" if quantized_base == "dequantize" else "from_quantized"
    if out_dtype != run_dtype:
        return f"dtype_change:{out_dtype}"
    return "exact"


def _model_kwargs(task: Any, tokenizer: Any) -> dict:
    kwargs = task.model_kwargs()
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


def _bnb_layers(model: Any) -> dict[str, torch.Tensor]:
    """Dequantized weights of every bitsandbytes linear layer, by module name (wrappers stripped)."""
    from peft.utils.integrations import dequantize_bnb_weight

    from .runs import strip_wrapper_prefix

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = weight.__class__.__name__ if weight is not None else ""
        if kind not in ("Params4bit", "Int8Params"):
            continue
        w = dequantize_bnb_weight(weight, state=getattr(module, "state", None))
        out[strip_wrapper_prefix(name)] = w.detach().to("cpu", torch.float32)
    return out


def _load_full_precision(run: Any, quantized_base: str) -> Any:
    """The run's method loaded onto an unquantized float32 base (weights reloaded or dequantized)."""
    from .backbones import load_model, resolve_backbone
    from .methods import MethodContext
    from .runs import MODEL_DIR

    backbone = run.recipe.backbone.model_copy(update={"quantization": "none", "dtype": "float32"})
    kwargs = _model_kwargs(run.task, run.tokenizer)
    path = resolve_backbone(backbone)
    dequantized: Optional[dict[str, torch.Tensor]] = None
    if run.recipe.backbone.quantization != "none" and quantized_base == "dequantize":
        dequantized = _bnb_layers(run.ctx.load_base())
        if not dequantized:
            raise PeftlabError("merge: the quantized base has no bitsandbytes layers to dequantize")

    def load_base() -> Any:
        model = load_model(backbone, run.task.auto_model, kwargs, path=path)
        if dequantized is not None:
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name, w in dequantized.items():
                    if name not in modules or tuple(modules[name].weight.shape) != tuple(w.shape):
                        raise PeftlabError(f"merge: dequantized weight '{name}' does not fit the full-precision base")
                    modules[name].weight.copy_(w)
        return model

    ctx = MethodContext(task=run.task, backbone=backbone, head_names=list(run.ctx.head_names), load_base=load_base)
    model = run.method.load(run.run_dir / MODEL_DIR, ctx)
    model.eval()
    return model


def _clean_config(model: Any) -> None:
    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if not k.startswith("_") and k != "labels"}


@torch.no_grad()
def compare_models(reference: Any, candidate: Any, task: Any, tokenizer: Any, examples: list[dict],
                   device: torch.device, batch_size: int = 32) -> dict:
    """Δlogit statistics and prediction agreement of two models on ``examples``.

    Δ is taken over every non-padding position (token tasks) or example (sequence tasks); agreement
    over the positions the task predicts (first sub-tokens for NER, one per text for classification).
    """
    from torch.utils.data import DataLoader

    encoded = task.encode(examples, tokenizer, "validation")
    dl = DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=task.collator(tokenizer))
    reference.eval()
    candidate.eval()
    max_abs, sum_abs, n_values, agree, n_pred = 0.0, 0.0, 0, 0, 0
    for batch in dl:
        inputs = _model_inputs(batch, device)
        a = reference(**inputs).logits.float()
        b = candidate(**inputs).logits.float()
        if a.shape != b.shape:
            raise VerificationError(
                f"verification: logits of shape {tuple(b.shape)} from the merged model, {tuple(a.shape)} from the run"
            )
        if a.dim() == 3:  # per token
            mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
            labels = batch.get("labels")
            if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(a.shape[:2]):
                pred_mask = (labels != -100).to(a.device)
            else:
                pred_mask = mask
            diff = (a - b).abs()[mask]
            agree += int((a.argmax(-1) == b.argmax(-1))[pred_mask].sum())
            n_pred += int(pred_mask.sum())
        else:
            diff = (a - b).abs()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n_pred += a.shape[0]
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


def task_metrics(model: Any, task: Any, tokenizer: Any, examples: list[dict], batch_size: int = 32) -> dict:
    """The task's own evaluator (``task.evaluate``) on ``examples``; scalar metrics only."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator()
    encoded = task.encode(examples, tokenizer, "eval").sorted_by_length()
    dl = accelerator.prepare(DataLoader(encoded, batch_size=batch_size, shuffle=False,
                                        collate_fn=task.collator(tokenizer)))
    if not _is_bnb(model):
        model.to(accelerator.device)
    metrics = task.evaluate(model, dl, accelerator, encoded)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _is_bnb(model: Any) -> bool:
    return any(p.__class__.__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def _count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _split_examples(task: Any, split: str, where: Path) -> list[dict]:
    splits = task.load_splits()
    rows = splits.validation if split == "validation" else splits.test
    if not rows:
        raise PeftlabError(f"{where}: data.{split}: the run has no {split} split to evaluate on")
    return rows


def _load_splits_or_explain(task: Any, run_dir: Path) -> Any:
    try:
        return task.load_splits()
    except PeftlabError as exc:
        raise PeftlabError(
            f"{run_dir / 'recipe.yaml'}: verification needs the run's validation data and could not read it "
            f"({exc}); run the merge from the folder the run was trained in"
        ) from None


# --------------------------------------------------------------------------------------- merge


def merge(
    run_dir: PathLike,
    out: PathLike,
    *,
    dtype: Optional[str] = None,
    verify_examples: int = DEFAULT_VERIFY_EXAMPLES,
    atol: Optional[float] = None,
    min_agreement: Optional[float] = None,
    eval_split: str = "validation",
    quantized_base: str = QUANTIZED_BASE_MODES[0],
    overwrite: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Merge a finished run into a plain transformers checkpoint at ``out``; returns verify.json.

    ``dtype``: float32 | bfloat16 | float16 (default: the run's backbone.dtype). ``verify_examples``:
    how many validation examples both models run on. ``atol`` / ``min_agreement`` override the
    default thresholds of the merge kind (see ``THRESHOLDS``). ``eval_split``: where the task metric
    of both models is measured (``none`` to skip). ``quantized_base``: for runs on int8/nf4/fp4
    backbones, ``dequantize`` the quantized weights the adapter was trained against (default) or
    ``reload`` the original full-precision ones.
    Raises VerificationError (nothing written) when the merged checkpoint fails the thresholds.
    """
    from .runs import load_run

    run_dir, out = Path(run_dir), Path(out)
    recipe, method = _recipe_and_method(run_dir)
    _refuse_unmergeable(run_dir, method)
    if dtype is None:
        dtype = recipe.backbone.dtype
    if dtype not in DTYPES:
        raise PeftlabError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if quantized_base not in QUANTIZED_BASE_MODES:
        raise PeftlabError(f"--quantized-base: '{quantized_base}' is not one of {', '.join(QUANTIZED_BASE_MODES)}")
    if eval_split not in EVAL_SPLITS:
        raise PeftlabError(f"--eval-split: '{eval_split}' is not one of {', '.join(EVAL_SPLITS)}")
    if verify_examples < 1:
        raise PeftlabError("--verify-examples: expected a positive number of validation examples")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise PeftlabError("--min-agreement: expected a fraction between 0 and 1")
    if atol is not None and atol < 0:
        raise PeftlabError("--atol: expected a non-negative tolerance")
    _check_out(out, overwrite, [run_dir])

    kind = merge_kind(recipe.backbone.quantization, recipe.backbone.dtype, dtype, quantized_base)
    default = THRESHOLDS[kind]
    thresholds = {
        "max_abs_logit_diff": default.atol if atol is None else atol,
        "min_agreement": default.min_agreement if min_agreement is None else min_agreement,
        "defaults_of": kind,
        "note": default.note,
    }

    device = _device()
    log(f"merge: loading {run_dir} as trained ({recipe.method.name}, quantization {recipe.backbone.quantization})")
    run = load_run(run_dir, device=device)
    reference = run.model
    if not _is_bnb(reference):
        reference.to(device)
    splits = _load_splits_or_explain(run.task, run_dir)
    verify_rows = splits.validation[:verify_examples]
    if recipe.backbone.quantization != "none":
        log(f"merge: {recipe.backbone.quantization} backbone: {quantized_base} the base in full precision, load the adapter, merge")

    from .backbones import auto_class

    metrics_json = _read_json(run_dir / "metrics.json") or {}
    params_json = _read_json(run_dir / "params.json") or {}
    with atomic_dir(out) as tmp:
        # merge and write, then verify what is on disk (loaded back by plain transformers)
        merged = _merged_model(run, quantized_base, dtype)
        merged_params = _count_params(merged)
        _save_merged(run, merged, tmp)
        del merged
        checkpoint = auto_class(run.task.auto_model).from_pretrained(str(tmp), dtype="auto")
        checkpoint.to(device)
        checkpoint.eval()
        log(f"merge: verifying on {len(verify_rows)} validation example(s)")
        stats = compare_models(reference, checkpoint, run.task, run.tokenizer, verify_rows, device)
        report: dict[str, Any] = {
            "run": str(run_dir.resolve()),
            "task": run.task.name,
            "method": method.name,
            "backbone": recipe.backbone.name,
            "quantization": recipe.backbone.quantization,
            "quantized_base": quantized_base if recipe.backbone.quantization != "none" else None,
            "run_dtype": recipe.backbone.dtype,
            "dtype": dtype,
            "kind": kind.split(":")[0],
            "split": "validation",
            **stats,
            "thresholds": thresholds,
            "params": {"merged": _count_params(checkpoint), "run_total": params_json.get("total_params")},
            "peftlab_version": __version__,
        }
        if eval_split != "none":
            rows = splits.validation if eval_split == "validation" else splits.test
            if rows:
                log(f"merge: task metric of both models on {len(rows)} {eval_split} example(s)")
                metric = metrics_json.get("metric") or run.task.check_metric(recipe.train.metric)
                m_ref = task_metrics(reference, run.task, run.tokenizer, rows)
                m_new = task_metrics(checkpoint, run.task, run.tokenizer, rows)
                report["metrics"] = {
                    "split": eval_split,
                    "metric": metric,
                    "unmerged": m_ref,
                    "merged": m_new,
                    "delta": m_new.get(metric, math.nan) - m_ref.get(metric, math.nan),
                }
        failures = _failures(stats, thresholds)
        if merged_params != report["params"]["merged"]:
            failures.append(f"the saved checkpoint has {report['params']['merged']} parameters, the merged model {merged_params}")
        report["passed"] = not failures
        if failures:
            raise VerificationError(
                f"{out}: verification failed: the merged checkpoint differs from the run on "
                f"{stats['examples']} validation example(s): {'; '.join(failures)}; nothing was written "
                f"(thresholds of a '{kind}' merge; --atol / --min-agreement change them)"
            )
        write_json(tmp / VERIFY_FILE, report)
        write_json(tmp / MERGE_FILE, {"format": MERGE_FORMAT, "task": run.task.name, "method": method.name,
                                      "source_run": str(run_dir.resolve()), "recipe": recipe.to_dict(),
                                      "peftlab_version": __version__})
        write_text(tmp / "README.md", model_card(run, report, metrics_json, params_json))
    log(f"merge: wrote {out} (max |Δlogit| {stats['max_abs_logit_diff']:.3g}, agreement {100 * stats['agreement']:.2f}%)")
    return report


def _merged_model(run: Any, quantized_base: str, dtype: str) -> Any:
    """The run's method merged into full-precision weights, cast to ``dtype``."""
    merged = run.method.merge(_load_full_precision(run, quantized_base))
    _clean_config(merged)
    merged = merged.to(getattr(torch, dtype))
    for hook in _before_save_hooks:
        hook(merged)
    return merged


def _save_merged(run: Any, merged: Any, folder: Path) -> None:
    merged.save_pretrained(str(folder))
    run.tokenizer.save_pretrained(str(folder))
    bad = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if bad or not any(p.suffix == ".safetensors" for p in folder.iterdir()):  # pragma: no cover
        raise PeftlabError(f"merge: expected safetensors weights only in {folder}, found {bad or 'none'}")


def _failures(stats: dict, thresholds: dict) -> list[str]:
    failures = []
    atol = thresholds["max_abs_logit_diff"]
    if atol is not None and not stats["max_abs_logit_diff"] <= atol:
        failures.append(f"max |Δlogit| {stats['max_abs_logit_diff']:.3g} > tolerance {atol:g}")
    if stats["agreement"] < thresholds["min_agreement"]:
        failures.append(
            f"prediction agreement {100 * stats['agreement']:.2f}% < {100 * thresholds['min_agreement']:.2f}%"
        )
    return failures


# ---------------------------------------------------------------------------------- model card


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _data_lines(recipe: Any, metrics_json: dict) -> list[str]:
    d = recipe.data
    lines = []
    if d.hub:
        lines.append(f"- hub dataset: `{d.hub}`" + (f" (config `{d.hub_config}`)" if d.hub_config else ""))
    lines.append(f"- train: `{d.train}`" + (f" (fixed-seed subset of {d.max_train_samples})" if d.max_train_samples else ""))
    if d.validation:
        lines.append(f"- validation: `{d.validation}`")
    else:
        lines.append(f"- validation: {d.validation_split:.0%} of train held out (seed {d.split_seed})")
    if d.test:
        n = (metrics_json.get("test") or {}).get("examples")
        size = f" ({n:,} examples{', a fixed-seed subset' if d.max_test_samples else ''})" if isinstance(n, int) else ""
        lines.append(f"- test: `{d.test}`{size}")
    lines.append(f"- max_length: {d.max_length} tokens")
    return lines


def _metric_table(metrics_json: dict) -> list[str]:
    rows = []
    for split in ("dev", "test"):
        m = metrics_json.get(split)
        if not isinstance(m, dict):
            continue
        rows.append((split, {k: v for k, v in m.items() if k not in ("epoch", "step", "examples", "per_type")
                             and isinstance(v, (int, float)) and not isinstance(v, bool)}))
    if not rows:
        return ["(the run has no metrics.json)"]
    keys = [k for k in rows[0][1]]
    out = ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, m in rows:
        out.append(f"| {split} | " + " | ".join(_fmt(m.get(k, math.nan)) for k in keys) + " |")
    best = metrics_json.get("best_epoch")
    if best is not None:
        out.append("")
        out.append(f"Best model: epoch {best}, step {metrics_json.get('best_step')} "
                   f"(selected on validation {metrics_json.get('metric')}).")
    return out


def _params_lines(params_json: dict, report: dict) -> list[str]:
    lines = []
    if params_json:
        lines += [
            f"- backbone: {_fmt(params_json.get('backbone_params'))}, task head: {_fmt(params_json.get('head_params'))}",
            f"- trained: {_fmt(params_json.get('trainable_params'))} "
            f"({params_json.get('trainable_pct')}% of {_fmt(params_json.get('total_params'))}; "
            f"without the head {_fmt(params_json.get('trainable_params_without_head'))} = "
            f"{params_json.get('trainable_pct_without_head')}%)",
        ]
        if params_json.get("method_added_params"):
            lines.append(f"- added by the method while training: {_fmt(params_json['method_added_params'])}")
    merged = (report.get("params") or {}).get("merged")
    if merged is not None:
        lines.append(f"- this checkpoint: {_fmt(merged)} parameters (the method is folded into the weights)")
    return lines


def _verify_lines(report: dict) -> list[str]:
    t = report["thresholds"]
    atol = "reported only" if t["max_abs_logit_diff"] is None else f"<= {t['max_abs_logit_diff']:g}"
    lines = [
        f"The merged checkpoint, loaded back with plain `transformers`, was run next to the unmerged model "
        f"(exactly as trained{', on the ' + report['quantization'] + ' backbone' if report.get('quantization') not in (None, 'none') else ''}) "
        f"on the first {report['examples']} validation examples:",
        "",
        "| check | value | threshold |",
        "|---|---|---|",
        f"| max abs logit diff | {_fmt(report['max_abs_logit_diff'])} | {atol} |",
        f"| mean abs logit diff | {_fmt(report['mean_abs_logit_diff'])} | |",
        f"| prediction agreement | {100 * report['agreement']:.2f}% of {report['predictions']:,} | "
        f">= {100 * t['min_agreement']:.2f}% |",
        "",
        f"Merge kind `{report['kind']}` ({t['note']}).",
    ]
    if report.get("quantization") not in (None, "none"):
        lines += [
            "",
            f"The adapter was trained on a **{report['quantization']}** quantized backbone; this checkpoint "
            f"holds {'the original full-precision' if report.get('quantized_base') == 'reload' else 'the dequantized'} "
            f"base weights with the adapter merged into them, in {report['dtype']}. The numbers above are the "
            f"gap this introduces.",
        ]
    m = report.get("metrics")
    if m:
        metric = m["metric"]
        lines += [
            "",
            f"Task metric on the {m['split']} split ({m['unmerged'].get('examples', '?')} examples):",
            "",
            f"| model | {metric} | loss |",
            "|---|---|---|",
            f"| unmerged (as trained) | {_fmt(m['unmerged'].get(metric, math.nan))} | {_fmt(m['unmerged'].get('loss', math.nan))} |",
            f"| merged (this checkpoint) | {_fmt(m['merged'].get(metric, math.nan))} | {_fmt(m['merged'].get('loss', math.nan))} |",
            "",
            f"Δ{metric} = {m['delta']:+.6f}",
        ]
    return lines


def _usage(task: str, name: str) -> list[str]:
    if task == "token_classification":
        code = [
            "from transformers import pipeline",
            "",
            f'ner = pipeline("token-classification", model="{name}", aggregation_strategy="simple")',
            'print(ner("Heading to the Eiffel Tower with Emma tomorrow"))',
        ]
    elif task == "sequence_classification":
        code = [
            "from transformers import pipeline",
            "",
            f'classify = pipeline("text-classification", model="{name}")',
            'print(classify("my card still has not arrived"))',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{name}")',
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        ]
    return ["```python", *code, "```", "", "or with peftlab: `peftlab predict " + name + ' "some text"`']


def model_card(run: Any, report: dict, metrics_json: dict, params_json: dict) -> str:
    """README.md of a merged checkpoint: what it is, how it was trained and verified, how to use it."""
    recipe, task = run.recipe, run.task.name
    method_opts = run.method.options.model_dump(mode="json")
    tags = ["peftlab", run.method.name, task.replace("_", "-")]
    if recipe.backbone.quantization != "none":
        tags.append(recipe.backbone.quantization)
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {PIPELINE_TAGS.get(task, task)}",
        f"base_model: {json.dumps(recipe.backbone.name)}",
        f"tags: {_yaml_list(tags)}",
        "---",
        "",
        f"# {recipe.description or Path(report['run']).name}",
        "",
        f"A `{task}` model: **{recipe.backbone.name}** fine-tuned with **{run.method.name}** by peftlab "
        f"{__version__} and merged into a plain `transformers` checkpoint ({report['dtype']}, safetensors). "
        f"Loading it needs neither peft nor peftlab.",
        "",
        "## Usage",
        "",
        *_usage(task, "PATH/TO/THIS/FOLDER"),
        "",
        "## Model",
        "",
        f"- backbone: `{recipe.backbone.name}`" + (f" (revision `{recipe.backbone.revision}`)" if recipe.backbone.revision else ""),
        f"- quantization while training: {recipe.backbone.quantization}",
        f"- method: `{run.method.name}` " + ", ".join(f"{k}={v}" for k, v in method_opts.items()),
        f"- labels ({len(run.task.labels)}): " + ", ".join(f"`{label}`" for label in run.task.labels),
        f"- source run: `{report['run']}`",
        "",
        "## Parameters",
        "",
        *_params_lines(params_json, report),
        "",
        "## Data",
        "",
        *_data_lines(recipe, metrics_json),
        "",
        "## Metrics of the run",
        "",
        *_metric_table(metrics_json),
        "",
        "## Merge verification",
        "",
        *_verify_lines(report),
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- export


def export(
    run_dir: PathLike,
    out: PathLike,
    *,
    verify_examples: int = DEFAULT_VERIFY_EXAMPLES,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Package a run (any method, mergeable or not) for ``peftlab predict``; returns verify.json.

    The package is a minimal run folder: ``model/`` (the method's weights, safetensors, tokenizer,
    peftlab_method.json), ``recipe.yaml`` (its ``backbone`` section is the reference to the base),
    ``labels.json``, the run's metrics/params, ``peftlab_export.json`` and a README. The base
    backbone is not copied: ``load_run``/``predict`` load it by name and apply the saved method.
    The package is loaded back and checked against the run before it becomes visible.
    """
    from .backbones import resolve_backbone
    from .runs import MODEL_DIR, load_run

    run_dir, out = Path(run_dir), Path(out)
    recipe, method = _recipe_and_method(run_dir)
    if verify_examples < 1:
        raise PeftlabError("--verify-examples: expected a positive number of validation examples")
    _check_out(out, overwrite, [run_dir])
    device = _device()
    log(f"export: loading {run_dir}")
    run = load_run(run_dir, device=device)
    if not _is_bnb(run.model):
        run.model.to(device)
    rows = _load_splits_or_explain(run.task, run_dir).validation[:verify_examples]
    with atomic_dir(out) as tmp:
        shutil.copytree(run_dir / MODEL_DIR, tmp / MODEL_DIR)
        for name in ("recipe.yaml", "labels.json", "metrics.json", "params.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        info = {
            "format": EXPORT_FORMAT,
            "task": run.task.name,
            "method": method.name,
            "can_merge": bool(method.can_merge),
            "base": {
                "name": recipe.backbone.name,
                "revision": recipe.backbone.revision,
                "quantization": recipe.backbone.quantization,
                "dtype": recipe.backbone.dtype,
                "resolved_at_export": resolve_backbone(recipe.backbone),
            },
            "labels": list(run.task.labels),
            "source_run": str(run_dir.resolve()),
            "peftlab_version": __version__,
        }
        write_json(tmp / EXPORT_FILE, info)
        log(f"export: verifying the package on {len(rows)} validation example(s)")
        package = load_run(tmp, device=device)
        if not _is_bnb(package.model):
            package.model.to(device)
        stats = compare_models(run.model, package.model, run.task, run.tokenizer, rows, device)
        thresholds = {"max_abs_logit_diff": 1e-4, "min_agreement": 1.0, "defaults_of": "export",
                      "note": "the package must reproduce the run"}
        failures = _failures(stats, thresholds)
        if failures:
            raise VerificationError(f"{out}: verification failed: the exported package does not reproduce the run: "
                                    f"{'; '.join(failures)}; nothing was written")
        report = {"run": str(run_dir.resolve()), "task": run.task.name, "method": method.name,
                  "backbone": recipe.backbone.name, "quantization": recipe.backbone.quantization,
                  "kind": "export", "split": "validation", **stats, "thresholds": thresholds, "passed": True,
                  "peftlab_version": __version__}
        write_json(tmp / VERIFY_FILE, report)
        write_text(tmp / "README.md", export_card(run, info, report))
    log(f"export: wrote {out}")
    return report


def export_card(run: Any, info: dict, report: dict) -> str:
    recipe = run.recipe
    metrics_json = _read_json(run.run_dir / "metrics.json") or {}
    params_json = _read_json(run.run_dir / "params.json") or {}
    opts = run.method.options.model_dump(mode="json")
    return "\n".join([
        f"# {recipe.description or Path(info['source_run']).name} (peftlab export)",
        "",
        f"A `{run.task.name}` model trained with **{run.method.name}** on **{recipe.backbone.name}** by peftlab "
        f"{__version__}. This folder holds the method's weights only"
        + ("" if run.method.can_merge else f" (`{run.method.name}` cannot be merged into the backbone's weights)")
        + "; the base backbone is loaded by name:",
        "",
        f"- base: `{recipe.backbone.name}`" + (f" (revision `{recipe.backbone.revision}`)" if recipe.backbone.revision else "")
        + f", quantization {recipe.backbone.quantization}, dtype {recipe.backbone.dtype}",
        f"- method: `{run.method.name}` " + ", ".join(f"{k}={v}" for k, v in opts.items()),
        f"- labels ({len(run.task.labels)}): " + ", ".join(f"`{label}`" for label in run.task.labels),
        "",
        "## Usage",
        "",
        "```bash",
        'peftlab predict PATH/TO/THIS/FOLDER "some text"',
        "peftlab predict PATH/TO/THIS/FOLDER --input texts.txt",
        "```",
        "",
        "```python",
        "import peftlab",
        'print(peftlab.predict("PATH/TO/THIS/FOLDER", ["some text"]))',
        "```",
        "",
        "## Parameters",
        "",
        *_params_lines(params_json, {}),
        "",
        "## Data",
        "",
        *_data_lines(recipe, metrics_json),
        "",
        "## Metrics of the run",
        "",
        *_metric_table(metrics_json),
        "",
        "## Export verification",
        "",
        f"Loaded back from this folder, the model reproduces the run on {report['examples']} validation examples: "
        f"max |Δlogit| {_fmt(report['max_abs_logit_diff'])}, agreement {100 * report['agreement']:.2f}%.",
        "",
    ])


# ----------------------------------------------------------------------------------------- CLI


def _stderr(msg: str) -> None:
    print(f"[peftlab] {msg}", file=sys.stderr, flush=True)


def add_commands(sub: Any, command: Callable) -> None:
    """Register ``peftlab merge`` and ``peftlab export`` (called by peftlab.cli)."""
    m = sub.add_parser(
        "merge",
        help="merge a run into a plain transformers checkpoint (verified against the run)",
        description="Fold the run's method into the backbone's weights and write a checkpoint that "
        "transformers loads without peft/peftlab. The merged model is checked against the run before "
        "anything is written; exit 4 when it does not reproduce it.",
    )
    m.add_argument("run_dir", help="a finished run folder")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the run's backbone.dtype)")
    m.add_argument("--verify-examples", type=int, default=DEFAULT_VERIFY_EXAMPLES,
                   help=f"validation examples both models run on (default {DEFAULT_VERIFY_EXAMPLES})")
    m.add_argument("--atol", type=float, default=None,
                   help="max |Δlogit| allowed (default: 1e-4 exact, 0.5 bfloat16, 0.1 float16, not enforced from quantized)")
    m.add_argument("--min-agreement", type=float, default=None,
                   help="minimum prediction agreement, a fraction (default: 1.0 exact, 0.99 dtype change or dequantized, 0.90 reloaded from quantized)")
    m.add_argument("--eval-split", choices=EVAL_SPLITS, default="validation",
                   help="split on which the task metric of both models is reported (default validation)")
    m.add_argument("--quantized-base", choices=QUANTIZED_BASE_MODES, default=QUANTIZED_BASE_MODES[0],
                   help="runs on int8/nf4/fp4 backbones: dequantize the quantized weights the adapter was trained "
                        "against (default; reproduces the run) or reload the original full-precision base")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command("merge")(_merge_cmd)

    e = sub.add_parser(
        "export",
        help="package a run (any method) for `peftlab predict`: adapter weights + config + base reference",
    )
    e.add_argument("run_dir", help="a finished run folder")
    e.add_argument("--out", required=True, help="output folder (written atomically)")
    e.add_argument("--verify-examples", type=int, default=DEFAULT_VERIFY_EXAMPLES)
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command("export")(_export_cmd)


def _merge_cmd(args: argparse.Namespace) -> int:
    report = merge(
        args.run_dir, args.out, dtype=args.dtype, verify_examples=args.verify_examples, atol=args.atol,
        min_agreement=args.min_agreement, eval_split=args.eval_split, quantized_base=args.quantized_base,
        overwrite=args.overwrite, log=_stderr,
    )
    line = (f"merged: {args.out} ({report['kind']}, {report['dtype']}): max |Δlogit| "
            f"{report['max_abs_logit_diff']:.3g}, mean {report['mean_abs_logit_diff']:.3g}, agreement "
            f"{100 * report['agreement']:.2f}% on {report['examples']} validation examples")
    m = report.get("metrics")
    if m:
        metric = m["metric"]
        line += (f"; {m['split']} {metric} unmerged {m['unmerged'].get(metric, math.nan):.4f} "
                 f"merged {m['merged'].get(metric, math.nan):.4f}")
    print(line)
    return 0


def _export_cmd(args: argparse.Namespace) -> int:
    report = export(args.run_dir, args.out, verify_examples=args.verify_examples, overwrite=args.overwrite,
                    log=_stderr)
    print(f"exported: {args.out} ({report['method']}; reproduces the run: max |Δlogit| "
          f"{report['max_abs_logit_diff']:.3g} on {report['examples']} validation examples)")
    return 0
