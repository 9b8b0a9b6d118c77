"""``merge(run_dir, out)``: a finished run's method folded into the backbone's weights, verified.

The checkpoint is one that plain ``transformers`` loads with ``AutoModelFor<Task>.from_pretrained(out)``
(no peft, no peftlab): ``model.safetensors``, ``config.json`` with ``id2label``/``label2id``, the
tokenizer files, ``verify.json``, ``peftlab_merge.json`` (task and resolved recipe, read by
``peftlab predict``) and a model card ``README.md``. It is written into a temporary folder, loaded
back with plain transformers and compared with the run as it was trained (verify.py) before it
becomes visible; below the thresholds nothing is written (VerificationError, CLI exit 4).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .._version import __version__
from ..atomicio import atomic_dir, remove_stale_temporaries, write_json, write_text
from ..backbones import auto_class, load_task_model, resolve_backbone
from ..errors import PeftlabError, VerificationError
from ..methods import MethodContext, build_method
from ..outputs import check_output, mark
from ..recipe import load_recipe
from ..runs import MODEL_DIR, load_run, strip_wrapper_prefix
from ..util import BNB_PARAMETER_TYPES, default_device, is_bnb_model, read_json_or_none
from .card import model_card
from .verify import QUANTIZED_BASE_MODES, THRESHOLDS, compare_models, merge_kind, task_metrics, threshold_failures

PathLike = Union[str, Path]
log = logging.getLogger("peftlab")

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_VERIFY_EXAMPLES = 200
EVAL_SPLITS = ("validation", "test", "none")
VERIFY_FILE = "verify.json"
MERGE_FILE = "peftlab_merge.json"  # task + resolved recipe of a merged checkpoint (predict reads it)
MERGE_FORMAT = "peftlab-merge/1"


def check_out(out: Path, overwrite: bool, sources: Sequence[Path]) -> None:
    """``--out`` must be outside the run and hold none of it; --overwrite replaces only a folder
    peftlab made. Leftovers of a killed merge/export into ``out`` are removed first."""
    for src in sources:
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise PeftlabError(f"--out: {out} is inside the run folder {src}; choose another folder")
    check_output(out, "--out", overwrite, [(src, "the run folder") for src in sources])
    remove_stale_temporaries(out.parent, name=out.name)


def recipe_and_method(run_dir: Path):

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


def _model_kwargs(task: Any, tokenizer: Any) -> dict:
    kwargs = task.model_kwargs()
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


def _bnb_layers(model: Any) -> dict[str, torch.Tensor]:
    """Dequantized weights of every bitsandbytes linear layer, by module name (wrappers stripped)."""
    from peft.utils.integrations import dequantize_bnb_weight


    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = weight.__class__.__name__ if weight is not None else ""
        if kind not in BNB_PARAMETER_TYPES:
            continue
        w = dequantize_bnb_weight(weight, state=getattr(module, "state", None))
        out[strip_wrapper_prefix(name)] = w.detach().to("cpu", torch.float32)
    return out


def _load_full_precision(run: Any, quantized_base: str) -> Any:
    """The run's method loaded onto an unquantized float32 base (weights reloaded or dequantized)."""

    backbone = run.recipe.backbone.model_copy(update={"quantization": "none", "dtype": "float32"})
    kwargs = _model_kwargs(run.task, run.tokenizer)
    path = resolve_backbone(backbone)
    dequantized: Optional[dict[str, torch.Tensor]] = None
    if run.recipe.backbone.quantization != "none" and quantized_base == "dequantize":
        dequantized = _bnb_layers(run.ctx.load_base())
        if not dequantized:
            raise PeftlabError("merge: the quantized base has no bitsandbytes layers to dequantize")

    def load_base() -> Any:
        model = load_task_model(backbone, run.task, kwargs, path=path)
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


def _merge_info(run: Any, method: Any, metrics_json: dict) -> dict:
    """peftlab_merge.json: the task and resolved recipe (predict rebuilds the task from them) and the
    multi-label decision threshold chosen on validation, if the run has one."""
    threshold = (metrics_json.get("dev") or {}).get("threshold")
    return {"format": MERGE_FORMAT, "task": run.task.name, "method": method.name,
            "source_run": str(run.run_dir.resolve()), "recipe": run.recipe.to_dict(),
            **({"threshold": threshold} if threshold is not None else {}), "peftlab_version": __version__}


def load_splits_or_explain(task: Any, run_dir: Path) -> Any:
    try:
        return task.load_splits()
    except PeftlabError as exc:
        raise PeftlabError(
            f"{run_dir / 'recipe.yaml'}: verification needs the run's validation data and could not read it "
            f"({exc}); run the merge from the folder the run was trained in"
        ) from None


def _check_options(dtype: str, quantized_base: str, eval_split: str, verify_examples: int,
                   atol: Optional[float], min_agreement: Optional[float]) -> None:
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


def _thresholds(kind: str, atol: Optional[float], min_agreement: Optional[float]) -> dict:
    """The kind's default thresholds, with the ones given on the command line instead."""
    default = THRESHOLDS[kind]
    return {
        "max_abs_logit_diff": default.atol if atol is None else atol,
        "min_agreement": default.min_agreement if min_agreement is None else min_agreement,
        "defaults_of": kind,
        "note": default.note,
    }


def _both_metrics(reference: Any, checkpoint: Any, run: Any, rows: list[dict], split: str, metric: str) -> dict:
    """The task metric of the unmerged and the merged model on ``rows``."""
    log.info(f"merge: task metric of both models on {len(rows)} {split} example(s)")
    m_ref = task_metrics(reference, run.task, run.tokenizer, rows)
    m_new = task_metrics(checkpoint, run.task, run.tokenizer, rows)
    return {"split": split, "metric": metric, "unmerged": m_ref, "merged": m_new,
            "delta": m_new.get(metric, math.nan) - m_ref.get(metric, math.nan)}


def _verify_report(run_dir: Path, run: Any, method: Any, dtype: str, kind: str, quantized_base: str, stats: dict,
                   thresholds: dict, checkpoint: Any, params_json: dict) -> dict:
    """verify.json of a merge: what was merged how, the comparison and the thresholds it was held to."""
    recipe = run.recipe
    return {
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
        "params": {"merged": sum(p.numel() for p in checkpoint.parameters()), "run_total": params_json.get("total_params")},
        "peftlab_version": __version__,
    }


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

    run_dir, out = Path(run_dir), Path(out)
    recipe, method = recipe_and_method(run_dir)
    _refuse_unmergeable(run_dir, method)
    if dtype is None:
        dtype = recipe.backbone.dtype
    _check_options(dtype, quantized_base, eval_split, verify_examples, atol, min_agreement)
    check_out(out, overwrite, [run_dir])

    kind = merge_kind(recipe.backbone.quantization, recipe.backbone.dtype, dtype, quantized_base)
    thresholds = _thresholds(kind, atol, min_agreement)

    device = default_device()
    log.info(f"merge: loading {run_dir} as trained ({recipe.method.name}, quantization {recipe.backbone.quantization})")
    run = load_run(run_dir, device=device)
    reference = run.model
    if not is_bnb_model(reference):
        reference.to(device)
    splits = load_splits_or_explain(run.task, run_dir)
    verify_rows = splits.validation[:verify_examples]
    if recipe.backbone.quantization != "none":
        log.info(f"merge: {recipe.backbone.quantization} backbone: {quantized_base} the base in full precision, load the adapter, merge")


    metrics_json = read_json_or_none(run_dir / "metrics.json") or {}
    params_json = read_json_or_none(run_dir / "params.json") or {}
    with atomic_dir(out) as tmp:
        # merge and write, then verify what is on disk (loaded back by plain transformers)
        merged = _merged_model(run, quantized_base, dtype)
        merged_params = sum(p.numel() for p in merged.parameters())
        _save_merged(run, merged, tmp)
        del merged
        checkpoint = run.task.prepare_model(auto_class(run.task.auto_model).from_pretrained(str(tmp), dtype="auto"),
                                            str(tmp))
        checkpoint.to(device)
        checkpoint.eval()
        log.info(f"merge: verifying on {len(verify_rows)} validation example(s)")
        stats = compare_models(reference, checkpoint, run.task, run.tokenizer, verify_rows, device)
        report = _verify_report(run_dir, run, method, dtype, kind, quantized_base, stats, thresholds, checkpoint,
                                params_json)
        if eval_split != "none":
            rows = splits.validation if eval_split == "validation" else splits.test
            if rows:
                metric = metrics_json.get("metric") or run.task.check_metric(recipe.train.metric)
                report["metrics"] = _both_metrics(reference, checkpoint, run, rows, eval_split, metric)
        failures = threshold_failures(stats, thresholds)
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
        mark(tmp, "merge")
        write_json(tmp / MERGE_FILE, _merge_info(run, method, metrics_json))
        write_text(tmp / "README.md", model_card(run, report, metrics_json, params_json, out))
    log.info(f"merge: wrote {out} (max |Δlogit| {stats['max_abs_logit_diff']:.3g}, agreement {100 * stats['agreement']:.2f}%)")
    return report


def _merged_model(run: Any, quantized_base: str, dtype: str) -> Any:
    """The run's method merged into full-precision weights, cast to ``dtype``."""
    merged = run.method.merge(_load_full_precision(run, quantized_base))
    _clean_config(merged)
    merged = merged.to(getattr(torch, dtype))
    return merged


def _save_merged(run: Any, merged: Any, folder: Path) -> None:
    merged = run.task.merged_model(merged)
    merged.save_pretrained(str(folder))
    run.tokenizer.save_pretrained(str(folder))
    bad = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if bad or not any(p.suffix == ".safetensors" for p in folder.iterdir()):  # pragma: no cover
        raise PeftlabError(f"merge: expected safetensors weights only in {folder}, found {bad or 'none'}")
