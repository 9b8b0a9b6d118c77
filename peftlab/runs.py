"""Building the model a recipe describes, and reading back a finished run.

Run folder layout (written by :mod:`peftlab.training`)::

    runs/<name>/
      recipe.yaml       the resolved recipe (every default filled in)
      labels.json       label list (index = class id)
      model/            best model in the method's format (safetensors, head included),
                        tokenizer files, peftlab_method.json
      metrics.json      dev/test metrics, best epoch/step, history; written last (= run complete)
      params.json       parameter counts
      resources.json    peak memory, wall time, throughput
      train.log         the log
      checkpoints/      resumable checkpoints (step-*/) and best/ (trainable state of the best eval)
      logs/             TensorBoard events (when installed)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .backbones import (PICKLE_SUFFIXES, find_head_names, load_task_model, load_tokenizer, resolve_backbone,
                        safetensors_problem)
from .atomicio import atomic_dir, write_json
from .checkpoint import latest_checkpoint
from .errors import PeftlabError, TrainingError
from .methods import Method, MethodContext, build_method, read_method_file, write_method_file
from .recipe import Recipe, load_recipe

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
EVALUATIONS_FILE = "evaluations.jsonl"  # one line per evaluation, appended as it happens


@dataclass
class BuiltModel:
    model: Any
    method: Method
    ctx: MethodContext
    counts: dict  # parameter counts of the bare backbone and head, before the method


def strip_wrapper_prefix(name: str) -> str:
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def is_head_parameter(name: str, head_names: list[str]) -> bool:
    return strip_wrapper_prefix(name).split(".", 1)[0] in head_names


def _numel(p: torch.Tensor) -> int:
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())  # 4-bit weights: count unpacked values
    return p.numel()


def build_model(recipe: Recipe, task: Any, tokenizer: Any = None, device: Optional[torch.device] = None) -> BuiltModel:
    """Backbone + fresh task head, then the method applied to it."""
    method = build_method(recipe)
    path = resolve_backbone(recipe.backbone)
    kwargs = task.model_kwargs()
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id

    def load_base() -> Any:
        return load_task_model(recipe.backbone, task, kwargs, path=path, device=device)

    base = load_base()
    head_names = find_head_names(base)
    counts = {"backbone": 0, "head": 0}
    for name, p in base.named_parameters():
        counts["head" if is_head_parameter(name, head_names) else "backbone"] += _numel(p)
    ctx = MethodContext(task=task, backbone=recipe.backbone, head_names=head_names, load_base=load_base)
    check_target_modules(recipe, base)
    model = method.apply(base, ctx)
    return BuiltModel(model, method, ctx, counts)


def check_target_modules(recipe: Recipe, model: Any) -> None:
    """A list of ``method.target_modules`` must name at least one module (as peft matches: the full
    name or its last dotted parts); peft's own error for this is a traceback."""
    targets = getattr(recipe.method_options, "target_modules", None)
    if not isinstance(targets, list) or not targets or model is None:
        return
    names = [n for n, _ in model.named_modules()]
    if any(n == t or n.endswith("." + t) for n in names for t in targets):
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    raise PeftlabError(f"method.target_modules: {targets} matches no module of {recipe.backbone.name}; "
                       f"its linear layers are named: {', '.join(linear)}")


def parameter_report(built: BuiltModel) -> dict:
    """Total/trainable counts and percentages, with and without the task head."""
    trainable = built.method.trainable_parameters(built.model)
    head_names = built.ctx.head_names
    t_all = sum(_numel(p) for p in trainable.values())
    t_head = sum(_numel(p) for n, p in trainable.items() if is_head_parameter(n, head_names))
    backbone, head = built.counts["backbone"], built.counts["head"]
    added = sum(
        _numel(p) for n, p in built.model.named_parameters()
    ) - backbone - head
    report = {
        "method": built.method.name,
        "backbone_params": backbone,
        "head_params": head,
        "total_params": backbone + head,
        "method_added_params": max(added, 0),
        "trainable_params": t_all,
        "trainable_head_params": t_head,
        "trainable_params_without_head": t_all - t_head,
        "trainable_pct": round(100.0 * t_all / (backbone + head), 6),
        "trainable_pct_without_head": round(100.0 * (t_all - t_head) / backbone, 6),
        "head_modules": head_names,
    }
    peft_counter = getattr(built.model, "get_nb_trainable_parameters", None)
    if callable(peft_counter):
        peft_trainable, peft_total = peft_counter()
        report["peft_count"] = {"trainable": int(peft_trainable), "total": int(peft_total)}
    return report


@dataclass
class LoadedRun:
    recipe: Recipe
    task: Any
    tokenizer: Any
    model: Any
    method: Method
    ctx: MethodContext
    run_dir: Path


def load_run(run_dir: str | Path, device: Optional[torch.device] = None) -> LoadedRun:
    """Rebuild a finished run's best model from its folder (base backbone + saved method weights)."""
    from .tasks import get_task_class

    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_DIR
    if not (run_dir / "recipe.yaml").is_file() or not model_dir.is_dir():
        raise PeftlabError(f"{run_dir}: not a finished peftlab run (needs recipe.yaml and model/)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    pickles = sorted(f.name for f in model_dir.iterdir() if f.name.endswith(PICKLE_SUFFIXES))
    if pickles and not recipe.backbone.allow_pickle:  # peftlab writes safetensors only: these came from elsewhere
        raise PeftlabError(
            f"{model_dir}: holds pickle weights ({pickles[0]}); pickle can run code on load and peftlab writes "
            f"safetensors only: remove them, or set backbone.allow_pickle: true in {run_dir / 'recipe.yaml'} if you trust them"
        )
    for weights in sorted(model_dir.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise PeftlabError(f"{weights}: not a complete safetensors file ({problem}); the run's model is damaged")
    info = read_method_file(model_dir)
    task = get_task_class(recipe.task)(recipe)
    task.set_labels(info["labels"])
    tokenizer = load_tokenizer(recipe.backbone, str(model_dir))
    method = build_method(recipe)
    path = resolve_backbone(recipe.backbone)
    kwargs = task.model_kwargs()
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id

    def load_base() -> Any:
        return load_task_model(recipe.backbone, task, kwargs, path=path, device=device)

    probe_heads = info.get("head_names")
    ctx = MethodContext(task=task, backbone=recipe.backbone, head_names=probe_heads or [], load_base=load_base)
    if not probe_heads:
        ctx.head_names = find_head_names(load_base())
    model = method.load(model_dir, ctx)
    model.eval()
    return LoadedRun(recipe, task, tokenizer, model, method, ctx, run_dir)


# ------------------------------------------------------------------------ writing a run's outputs


class RunLog:
    """The run's ``train.log``: every log line of the run, and why it stopped (rank 0 only)."""

    def __init__(self) -> None:
        self.handler: Optional[logging.FileHandler] = None

    def open(self, path: Path) -> None:
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger = logging.getLogger("peftlab")
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
        logger.addHandler(self.handler)

    def evaluation(self, entry: dict) -> None:
        """Append one evaluation's metrics to ``evaluations.jsonl`` beside train.log, as it happens
        (what a sweep's early stopping reads while the run goes on)."""
        if self.handler is not None:
            with open(Path(self.handler.baseFilename).with_name(EVALUATIONS_FILE), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")

    def record_failure(self, message: str) -> None:
        """Note in train.log why training stopped (stderr shows it once, as the CLI's error line)."""
        if self.handler is not None:
            logger = logging.getLogger("peftlab")
            self.handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "stopped: %s", (message,), None))

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger("peftlab").removeHandler(self.handler)
            self.handler.close()
            self.handler = None


_WRITE_FAILURE_WORDS = ("no space left", "read-only file system", "permission denied", "disk quota", "os error")


def write_error_reason(exc: BaseException) -> Optional[str]:
    """Why a write failed, when ``exc`` is a failed write: an OSError, or what safetensors (a
    SafetensorError) and tokenizers (a bare Exception) raise for the same OS errors; else None."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if type(exc).__name__ in ("SafetensorError", "Exception") and any(w in text.lower() for w in _WRITE_FAILURE_WORDS):
        return text
    return None


def write_failure(exc: BaseException, target: Path, what: str, ckpt_dir: Path, run_log: RunLog) -> TrainingError:
    """The error of a write that failed (full disk, permissions), naming the last good checkpoint."""
    last = latest_checkpoint(ckpt_dir)
    resume = "continue with --resume" if last else "run it again"
    message = (
        f"output.dir: cannot write {target} ({write_error_reason(exc) or exc}); {what}. Last good checkpoint: "
        f"{last or 'none'}; free space (or fix permissions) and {resume}"
    )
    run_log.record_failure(message)
    return TrainingError(message)


def write_best(folder: Path, tensors: dict[str, torch.Tensor], state: Any, metric: str) -> None:
    """The best model so far: its trainable tensors and which evaluation it came from."""
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        write_json(tmp / "best.json", {"step": state.best_step, "epoch": state.best_epoch, metric: state.best})


def read_best(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "trainable.safetensors"))


def write_results(run_dir: Path, model: Any, built: BuiltModel, tokenizer: Any, recipe: Recipe, params: dict,
                  resources: dict, results: dict, run_log: RunLog) -> None:
    """model/, params.json, resources.json and, last (it marks the run complete), metrics.json."""
    try:
        with atomic_dir(run_dir / MODEL_DIR) as tmp:
            built.method.save(model, tmp, built.ctx)
            tokenizer.save_pretrained(str(tmp))
            write_method_file(tmp, built.method, recipe, built.ctx.task.labels, built.ctx.head_names)
        params["model_dir_bytes"] = sum(f.stat().st_size for f in (run_dir / MODEL_DIR).rglob("*") if f.is_file())
        write_json(run_dir / "params.json", params)
        write_json(run_dir / "resources.json", resources)
        write_json(run_dir / "metrics.json", results)
    except Exception as exc:  # noqa: BLE001 - only write failures become the one-line error
        if write_error_reason(exc) is None:
            raise
        raise write_failure(exc, run_dir, "training finished but its results were not saved",
                            run_dir / CHECKPOINTS_DIR, run_log) from None
