"""Model cards (README.md) of merged checkpoints and exported packages."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .._version import __version__
from ..util import read_json_or_none

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


def _pipeline_tag(task: str) -> str:
    from ..tasks import get_task_class

    return get_task_class(task).pipeline_tag or task


def _usage(task: str, name: str) -> list[str]:
    from ..tasks import get_task_class

    return ["```python", *get_task_class(task).usage_code(name), "```", "",
            f"or with peftlab: `{get_task_class(task).predict_command(name)}`"]


def _run_sections(recipe: Any, metrics_json: dict, params_json: dict, report: dict) -> list[str]:
    """The Parameters, Data and Metrics sections both cards share."""
    return ["## Parameters", "", *_params_lines(params_json, report), "", "## Data", "",
            *_data_lines(recipe, metrics_json), "", "## Metrics of the run", "", *_metric_table(metrics_json), ""]


def _from_card(path: str, out: Path) -> str:
    """``path`` relative to the card's folder ``out``, so that the card names no absolute paths."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(out).resolve())
    except ValueError:  # another drive (Windows)
        return Path(path).name


def _labels_line(task: Any) -> list[str]:
    if not task.has_labels:
        return []
    return [f"- labels ({len(task.labels)}): " + ", ".join(f"`{label}`" for label in task.labels)]


def model_card(run: Any, report: dict, metrics_json: dict, params_json: dict, out: Path) -> str:
    """README.md of a merged checkpoint (written to ``out``): what it is, how it was trained and
    verified, how to use it."""
    recipe, task = run.recipe, run.task.name
    method_opts = run.method.options.model_dump(mode="json")
    tags = ["peftlab", run.method.name, task.replace("_", "-")]
    if recipe.backbone.quantization != "none":
        tags.append(recipe.backbone.quantization)
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {_pipeline_tag(task)}",
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
        *run.task.card_notes(),
        "## Model",
        "",
        f"- backbone: `{recipe.backbone.name}`" + (f" (revision `{recipe.backbone.revision}`)" if recipe.backbone.revision else ""),
        f"- quantization while training: {recipe.backbone.quantization}",
        f"- method: `{run.method.name}` " + ", ".join(f"{k}={v}" for k, v in method_opts.items()),
        *_labels_line(run.task),
        f"- source run: `{_from_card(report['run'], out)}` (relative to this folder)",
        "",
        *_run_sections(recipe, metrics_json, params_json, report),
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


def export_card(run: Any, info: dict, report: dict) -> str:
    recipe = run.recipe
    metrics_json = read_json_or_none(run.run_dir / "metrics.json") or {}
    params_json = read_json_or_none(run.run_dir / "params.json") or {}
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
        *_labels_line(run.task),
        "",
        "## Usage",
        "",
        "```bash",
        run.task.predict_command("PATH/TO/THIS/FOLDER"),
        f"peftlab predict PATH/TO/THIS/FOLDER --input {run.task.input_file}",
        "```",
        "",
        "```python",
        "from peftlab.api import predict",
        f'print(predict("PATH/TO/THIS/FOLDER", [{run.task.predict_input()}]))',
        "```",
        "",
        *_run_sections(recipe, metrics_json, params_json, {}),
        "## Export verification",
        "",
        f"Loaded back from this folder, the model reproduces the run on {report['examples']} validation examples: "
        f"max |Δlogit| {_fmt(report['max_abs_logit_diff'])}, agreement {100 * report['agreement']:.2f}%.",
        "",
    ])


def combine_card(first_run: Any, report: dict, out: Path) -> str:
    """README.md of a checkpoint combined from several LoRA runs (``merge --combine``)."""
    recipe, task = first_run.recipe, first_run.task.name
    rows = [f"| `{_from_card(s['run'], out)}` | {s['metric']} | {_fmt(s['source'].get(s['metric'], math.nan))} | "
            f"{_fmt(s['combined'].get(s['metric'], math.nan))} | {_fmt(s['fraction'])} |" for s in report["sources"]]
    return "\n".join([
        "---", "library_name: transformers", f"pipeline_tag: {_pipeline_tag(task)}",
        f"base_model: {json.dumps(recipe.backbone.name)}", f"tags: {_yaml_list(['peftlab', 'lora', 'combined', task.replace('_', '-')])}",
        "---", "",
        f"# {len(report['runs'])} LoRA runs combined ({report['how']})", "",
        f"A `{task}` model: **{recipe.backbone.name}** with {len(report['runs'])} LoRA adapters combined by peft's "
        f"`add_weighted_adapter` (`{report['how']}`, weights {report['weights']}, density {report['density']}), the task "
        f"heads averaged with the same weights, merged into a plain `transformers` checkpoint by peftlab {__version__}.", "",
        "## Usage", "", *_usage(task, "PATH/TO/THIS/FOLDER"), "",
        *_labels_line(first_run.task), "",
        "## Each source run's validation data", "",
        "| run (relative to this folder) | metric | run alone | combined | fraction |", "|---|---|---|---|---|", *rows, "",
        f"Required fraction: {report['thresholds']['min_fraction']}"
        + (" (**accepted below it with --accept-loss**)" if report["accepted_loss"] and not report["passed"] else ""), "",
        "## Merge verification", "", *_verify_lines(report), "",
    ])
