"""``merge --combine``: LoRA runs of one task and backbone combined into one merged checkpoint, verified.

The runs' LoRA weights load onto one base as separate adapters and peft's ``add_weighted_adapter``
combines them (``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, with the given
weights and density). Each run also trained its own task head; the combined head is their weighted
mean (weights normalised to sum 1). The result is merged into the base and written like a single
merge, after two checks:

* the written checkpoint reproduces the combined adapter (the thresholds of an exact merge);
* on each source run's validation data, the combined model's task metric is at least
  ``min_fraction`` of that run's own (a combination that silently went wrong, as peft's can, scores
  far below its sources). Below it: VerificationError (CLI exit 4), nothing written, unless
  ``accept_loss``; verify.json always holds every source's metric before and after.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .._version import __version__
from ..atomicio import atomic_dir, write_json, write_text
from ..backbones import auto_class
from ..errors import PeftlabError, VerificationError
from ..methods import merge_peft_model
from ..methods.lora import headless_lora_config
from ..outputs import mark
from ..runs import MODEL_DIR, load_run
from ..util import default_device
from .card import combine_card
from .merge import (DEFAULT_VERIFY_EXAMPLES, MERGE_FILE, MERGE_FORMAT, VERIFY_FILE, _clean_config, _save_merged,
                    check_out, load_splits_or_explain, recipe_and_method)
from .verify import THRESHOLDS, compare_models, task_metrics, threshold_failures

PathLike = Union[str, Path]
log = logging.getLogger("peftlab")

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DEFAULT_MIN_FRACTION = 0.9
COMBINED = "combined"


def check_sources(run_dirs: Sequence[Path], how: str, weights: Sequence[float], density: float) -> list:
    """The runs' recipes, after checking they can be combined (one line per problem)."""
    if len(run_dirs) < 2:
        raise PeftlabError("--combine: expected two or more LoRA runs")
    if how not in HOWS:
        raise PeftlabError(f"--how: '{how}' is not one of {', '.join(HOWS)}")
    if len(weights) != len(run_dirs) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise PeftlabError(f"--weights: expected {len(run_dirs)} positive numbers (one per run), got {list(weights)}")
    if not 0 < density <= 1:
        raise PeftlabError("--density: expected a fraction in (0, 1]")
    recipes = []
    for d in run_dirs:
        recipe, method = recipe_and_method(d)
        o = getattr(method, "options", None)
        if method.name != "lora":
            raise PeftlabError(f"{d}: method {method.name}; --combine takes LoRA runs")
        if o.use_dora or o.use_rslora:
            raise PeftlabError(f"{d}: {'DoRA' if o.use_dora else 'rsLoRA'} adapters cannot be combined: peft's "
                               f"add_weighted_adapter keeps neither DoRA magnitudes nor rsLoRA scaling")
        if recipe.backbone.quantization != "none":
            raise PeftlabError(f"{d}: a {recipe.backbone.quantization} run; --combine takes full-precision runs")
        first = recipes[0] if recipes else recipe
        for what, a, b in (("backbone", recipe.backbone.name, first.backbone.name), ("task", recipe.task, first.task)):
            if a != b:
                raise PeftlabError(f"{d}: {what} {a}; {run_dirs[0]} has {b} (combine runs of one {what})")
        recipes.append(recipe)
    return recipes


def combined_model(runs: list, how: str, weights: Sequence[float], density: float) -> Any:
    """A fresh base with every run's LoRA as an adapter, combined by peft into ``COMBINED`` (active);
    the head is the runs' weighted mean."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    names = [f"source{i}" for i in range(len(runs))]
    model, head_tensors = None, []
    for run, name in zip(runs, names):
        folder = run.run_dir / MODEL_DIR
        config = headless_lora_config(PeftConfig.from_pretrained(str(folder)))  # the heads are combined here
        state = load_file(str(folder / "adapter_model.safetensors"))
        head_tensors.append({k: v for k, v in state.items() if ".lora_" not in k})
        if model is None:
            model = get_peft_model(runs[0].ctx.load_base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        loaded = set_peft_model_state_dict(model, {k: v for k, v in state.items() if ".lora_" in k}, adapter_name=name)
        if loaded.unexpected_keys:
            raise PeftlabError(f"{folder}: adapter weights that do not fit the base: {loaded.unexpected_keys[:3]}")
    torch.manual_seed(0)  # DARE drops at random: the same runs give the same checkpoint
    try:
        model.add_weighted_adapter(names, list(weights), COMBINED, combination_type=how, density=density)
    except (ValueError, TypeError) as exc:  # e.g. ranks that differ, for a --how that needs one rank
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PeftlabError(f"--how {how}: peft cannot combine these adapters: {first[:300]}") from None
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)
    _set_head(model, head_tensors, weights)
    return model.eval()


def _set_head(model: Any, heads: list[dict], weights: Sequence[float]) -> None:
    """Each head tensor (saved as ``base_model.model.<name>``) := the weighted mean of the runs' own."""
    params = dict(model.named_parameters())
    total = float(sum(weights))
    with torch.no_grad():
        for key in heads[0]:
            if key not in params or any(key not in h for h in heads):
                raise PeftlabError(f"--combine: head tensor {key} is not in every run or not in the model")
            params[key].copy_(sum(h[key].float() * (w / total) for h, w in zip(heads, weights)))


def source_metrics(runs: list, checkpoint: Any, verify_examples: int) -> list[dict]:
    """Per source run: its own task metric and the combined model's on its first ``verify_examples``
    validation rows."""
    out = []
    for run in runs:
        rows = load_splits_or_explain(run.task, run.run_dir).validation[:verify_examples]
        metric = run.task.check_metric(run.recipe.train.metric)
        own = task_metrics(run.model, run.task, run.tokenizer, rows)
        combined = task_metrics(checkpoint, run.task, run.tokenizer, rows)
        a, b = own.get(metric, math.nan), combined.get(metric, math.nan)
        if a == b:
            fraction = 1.0
        else:
            fraction = (a / b if run.task.metric_mode(metric) == "min" else b / a) if a and b else 0.0
        out.append({"run": str(run.run_dir.resolve()), "examples": len(rows), "metric": metric,
                    "source": own, "combined": combined, "fraction": fraction})
    return out


def combine(
    run_dirs: Sequence[PathLike],
    out: PathLike,
    *,
    how: str = "linear",
    weights: Optional[Sequence[float]] = None,
    density: float = 0.5,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    accept_loss: bool = False,
    verify_examples: int = DEFAULT_VERIFY_EXAMPLES,
    overwrite: bool = False,
) -> dict:
    """Combine LoRA runs into one merged checkpoint at ``out`` (see the module docstring); returns verify.json."""
    dirs, out = [Path(d) for d in run_dirs], Path(out)
    weights = list(weights) if weights is not None else [1.0 / len(dirs)] * len(dirs)
    check_sources(dirs, how, weights, density)
    if not 0 <= min_fraction <= 1:
        raise PeftlabError("--min-fraction: expected a fraction between 0 and 1")
    if verify_examples < 1:
        raise PeftlabError("--verify-examples: expected a positive number of validation examples")
    check_out(out, overwrite, dirs)
    device = default_device()
    runs = [load_run(d, device=device) for d in dirs]
    for d, run in zip(dirs[1:], runs[1:]):
        if list(run.task.labels) != list(runs[0].task.labels):
            raise PeftlabError(f"{d}: its labels differ from {dirs[0]}'s; combined runs must predict the same labels")
    for run in runs:
        run.model.to(device).eval()
    log.info(f"merge: combining {len(runs)} LoRA runs ({how}, weights {weights})")
    reference = combined_model(runs, how, weights, density).to(device)
    first = runs[0]
    with atomic_dir(out) as tmp:
        merged = merge_peft_model(copy.deepcopy(reference))
        _clean_config(merged)
        _save_merged(first, merged, tmp)
        del merged
        checkpoint = first.task.prepare_model(auto_class(first.task.auto_model).from_pretrained(str(tmp), dtype="auto"),
                                              str(tmp)).to(device).eval()
        rows = load_splits_or_explain(first.task, first.run_dir).validation[:verify_examples]
        stats = compare_models(reference, checkpoint, first.task, first.tokenizer, rows, device)
        thresholds = {"max_abs_logit_diff": THRESHOLDS["exact"].atol, "min_agreement": THRESHOLDS["exact"].min_agreement,
                      "min_fraction": min_fraction, "defaults_of": "exact", "note": THRESHOLDS["exact"].note}
        sources = source_metrics(runs, checkpoint, verify_examples)
        report = {"runs": [str(d.resolve()) for d in dirs], "task": first.task.name, "method": "lora",
                  "backbone": first.recipe.backbone.name, "how": how, "weights": weights, "density": density,
                  "dtype": first.recipe.backbone.dtype, "kind": "combine", "split": "validation", **stats,
                  "sources": sources, "thresholds": thresholds, "accepted_loss": accept_loss,
                  "peftlab_version": __version__}
        failures = threshold_failures(stats, thresholds)
        losses = [f"{s['run']}: {s['metric']} {s['combined'].get(s['metric'], math.nan):.4f} combined vs "
                  f"{s['source'].get(s['metric'], math.nan):.4f} alone" for s in sources
                  if not s["fraction"] >= min_fraction]
        report["passed"] = not failures and not losses
        if failures or (losses and not accept_loss):
            raise VerificationError(f"{out}: verification failed: {'; '.join(failures + losses)}; nothing was written "
                                    f"(--min-fraction {min_fraction}; --accept-loss writes it anyway)")
        write_json(tmp / VERIFY_FILE, report)
        mark(tmp, "merge")
        write_json(tmp / MERGE_FILE, {"format": MERGE_FORMAT, "task": first.task.name, "method": "lora",
                                      "combined_from": report["runs"], "how": how, "weights": weights,
                                      "recipe": first.recipe.to_dict(), "peftlab_version": __version__})
        write_text(tmp / "README.md", combine_card(first, report, out))
    log.info(f"merge: wrote {out} (combined {len(runs)} runs with {how})")
    return report
