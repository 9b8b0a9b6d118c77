"""The Python API behind every CLI command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from .methods import available_methods, register_method  # noqa: F401  (re-exported)
from .recipe import Recipe, load_recipe, recipe_from_dict

RecipeLike = Union[str, os.PathLike, dict, Recipe]


def as_recipe(recipe: RecipeLike, overrides: Optional[list[str]] = None) -> Recipe:
    """A path, a dict or a Recipe (overrides apply to paths and dicts)."""
    if isinstance(recipe, Recipe):
        if overrides:
            from .recipe import apply_overrides

            return recipe_from_dict(apply_overrides(recipe.to_dict(), list(overrides)), recipe.source)
        return recipe
    if isinstance(recipe, dict):
        from .recipe import apply_overrides

        return recipe_from_dict(apply_overrides(dict(recipe), list(overrides or [])))
    return load_recipe(Path(recipe), overrides)


def train(recipe: RecipeLike, overrides: Optional[list[str]] = None, *, resume: bool = False,
          overwrite: bool = False) -> dict:
    """Train a recipe; returns metrics.json's content. The run folder is recipe.output.dir."""
    from .training import train as _train

    return _train(as_recipe(recipe, overrides), resume=resume, overwrite=overwrite)


def validate(recipe: RecipeLike, overrides: Optional[list[str]] = None, *, check_data: bool = True) -> dict:
    """Check a recipe without training: schema, method options, data files and labels, backbone name."""
    from .backbones import check_max_length, resolve_backbone
    from .tasks import get_task_class

    r = as_recipe(recipe, overrides)
    summary: dict[str, Any] = {"recipe": r.source, "task": r.task, "method": _method_line(r),
                               "quantization": r.backbone.quantization}
    task = get_task_class(r.task)(r)
    task.check_metric(r.train.metric)
    if check_data:
        splits = task.load_splits()
        summary.update(
            train=len(splits.train),
            validation=len(splits.validation),
            test=len(splits.test) if splits.test is not None else 0,
            **({"labels": len(task.labels)} if task.has_labels else {}),
        )
    summary["backbone"] = resolve_backbone(r.backbone)
    check_max_length(r.backbone, r.data.max_length)
    if check_data:
        from .backbones import empty_model
        from .runs import check_target_modules

        model = empty_model(r.backbone, task.auto_model, task.model_kwargs(), summary["backbone"])
        check_target_modules(r, model)
        summary["trainable"] = _trainable_on_meta(r, task, model)
    if r.backbone.quantization != "none":  # bitsandbytes installed? (train would fail at model load)
        from .backbones import quantization_config

        quantization_config(r.backbone, [])
    return summary


def _method_line(r: Any) -> str:
    """``lora (r=16, target_modules=all-linear)``: the method and the options that differ from its defaults."""
    options = r.method_options
    defaults = type(options)().model_dump(mode="json") if _has_defaults(type(options)) else {}
    changed = {k: v for k, v in options.model_dump(mode="json").items() if defaults.get(k, object()) != v}
    inner = ", ".join(f"{k}={v if not isinstance(v, list) else '+'.join(map(str, v))}" for k, v in changed.items())
    return f"{r.method.name} ({inner})" if inner else r.method.name


def _has_defaults(options_cls: Any) -> bool:
    return all(not f.is_required() for f in options_cls.model_fields.values())


def _trainable_on_meta(r: Any, task: Any, model: Any) -> Optional[str]:
    """Trainable parameters of the method on the backbone's empty (meta) modules; quantization does
    not change the count. None when the method cannot be applied without weights."""
    from .planner.build import apply_method

    if model is None:
        return None
    try:
        model.tie_weights()  # as loading does (an empty model is built untied)
        built, params = apply_method(r, task, model)
        trainable = sum(p.numel() for p in params.values())
        total = sum(p.numel() for p in built.parameters())
    except Exception:  # noqa: BLE001 - a count only; training reports real problems
        return None
    return f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


def plan(recipe: RecipeLike, overrides: Optional[list[str]] = None, *, device: Optional[str] = None,
         memory: Any = None, fit: bool = False) -> Any:
    """The recipe's predicted memory and speed (``peftlab.planner.Plan``); ``fit``: the largest setting
    that fits ``memory`` (e.g. "20GiB"; default: available now)."""
    from .planner import plan as make_plan

    return make_plan(as_recipe(recipe, overrides), device=device, memory=memory, fit=fit)


def merge(run_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> dict:
    """Merge a finished run into a verified plain-transformers checkpoint; returns verify.json.

    Options: dtype, verify_examples, atol, min_agreement, eval_split, quantized_base, overwrite
    (see peftlab.deploy.merge). Raises VerificationError (nothing written) when the check fails.
    """
    from .deploy import merge as _merge

    return _merge(run_dir, out, **options)


def combine(run_dirs: Any, out: Union[str, os.PathLike], **options: Any) -> dict:
    """Combine LoRA runs of one task into one verified merged checkpoint (``merge --combine``); returns verify.json."""
    from .deploy import combine as _combine

    return _combine(run_dirs, out, **options)


def export(run_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> dict:
    """Package any run (adapter weights + config + base reference) for predict; returns verify.json."""
    from .deploy import export as _export

    return _export(run_dir, out, **options)


def predict(model_dir: Any, texts: Any, **options: Any) -> list[dict]:
    """Predictions for texts from a run folder, an export or a merged checkpoint (peftlab.predict)."""
    from .predict import predict as _predict

    return _predict(model_dir, texts, **options)


def load_adapters(folders: Any, **options: Any) -> Any:
    """Several runs, exports or merged checkpoints (``[name=]folder``) in one process, their common
    weights held once; ``.predict(name, texts)`` (peftlab.adapters)."""
    from .adapters import load_adapters as _load

    return _load(folders, **options)


def bench(spec: Union[str, os.PathLike], **options: Any) -> Any:
    """Run a benchmark spec (one process per cell, resumable) and write its report (peftlab.bench).

    Options: quick, only, rerun, resume, skip_failed, keep_changed, results_dir, work_dir, list_only, report,
    allow_dirty (see peftlab.bench.runner.run_bench).
    """
    from .bench import run_bench

    return run_bench(spec, **options)


def report(results: Union[str, os.PathLike], out_dir: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Markdown/CSV/PNG report of a bench's results JSONL (peftlab.bench.report)."""
    from .bench import write_report

    return write_report(results, out_dir)
