"""Bench records: one JSON object per cell in ``results.jsonl``, read by the runner and the report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional, TextIO, Union

import yaml

from ..atomicio import write_text
from ..errors import PeftlabError
from ..util import read_json_or_none, read_utf8, scalar_items
from .plan import BenchPlan, Cell, _hash

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"


def read_records(path: Union[str, os.PathLike], warn: Optional[TextIO] = None) -> list[dict]:
    """The complete records of a results JSONL. A line that is not a whole JSON object is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_text(encoding="utf-8")
    records = []
    lines = data.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        complete = i < len(lines)  # the text after the last newline is an unfinished line
        try:
            rec = json.loads(line) if complete else None
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "cell" not in rec:
            if warn is not None:
                print(f"[bench] {path}:{i}: not a complete record, ignored", file=warn)
            continue
        records.append(rec)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


def load_records(path: Union[str, os.PathLike]) -> list[dict]:
    """Every record of a results file for ``peftlab report``: a line that is not one is an error
    (the bench writes the file atomically, so a bad line is not an interrupted write)."""
    path = Path(path)
    if path.is_dir():
        raise PeftlabError(f"{path}: is a folder; expected a results file (results.jsonl)")
    if not path.is_file():
        raise PeftlabError(f"{path}: results file not found")
    text = read_utf8(path, "expected the JSON lines peftlab bench writes")
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftlabError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
        if not isinstance(rec, dict) or "cell" not in rec:
            raise PeftlabError(f"{path}:{i}: not a bench record (a JSON object with a 'cell' key)")
        records.append(rec)
    if not records:
        raise PeftlabError(f"{path}: holds no records")
    return records


def last_error_line(text: str) -> str:
    """The line that says why a cell failed: peftlab's one-line error, else the last non-progress line."""
    lines = [ln.strip() for chunk in text.splitlines() for ln in chunk.split("\r")]
    lines = [ln for ln in lines if ln and not re.match(r"^\S*:?\s*\d+%\|", ln) and "it/s]" not in ln and "s/it]" not in ln]
    for ln in reversed(lines):
        if ln.startswith("peftlab: error:"):
            return ln
    return lines[-1] if lines else ""


CELL_PLAN_FILE = "memory_plan.json"  # in the cell's folder: `peftlab plan --json` for the cell, run before it


def build_record(plan: BenchPlan, cell: Cell, ctx: dict, run_dir: Optional[Path], *, status: str,
                 error: Optional[str] = None, returncode: Optional[int] = None,
                 parent_peak: Optional[int] = None, cell_wall: Optional[float] = None,
                 started: Optional[float] = None, resumed: bool = False, harvested: bool = False,
                 command: Optional[list[str]] = None, load: Optional[list[float]] = None) -> dict:
    rec: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "status": status,
        "error": error,
        "cell": cell.id,
        "config": cell.config,
        "seed": cell.seed,
        "kind": cell.kind,
        "compare_to": cell.compare_to,
        "spec": plan.name,
        "spec_path": str(plan.spec_path),
        "profile": plan.profile,
        "spec_hash": plan.spec_hash,
        "recipe": cell.recipe,
        "recipe_hash": cell.recipe_hash,
        "overrides": cell.overrides,
        "script": cell.script,
        "axes": cell.axes,
        "method": cell.method,
        "method_options": cell.method_options,
        "quantization": cell.quantization,
        "backbone": cell.backbone,
        "task": cell.task,
        "bench_command": plan.command,
        "command": command,
        "returncode": returncode,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)) if started else None,
        "cell_wall_s": round(cell_wall, 3) if cell_wall is not None else None,
        "resumed": resumed,
        "harvested": harvested,
        # 1-minute load average of the machine while the cell ran (timings on a busy machine are slower)
        "load_avg": {"mean": round(sum(load) / len(load), 2), "max": round(max(load), 2), "samples": len(load)}
        if load else None,
        "versions": ctx["versions"],
        "git": ctx["git"],
        "machine": ctx["machine"],
    }
    if status == "ok" and run_dir is not None:
        _add_run_fields(rec, run_dir, parent_peak)
        planned = read_json_or_none(run_dir.parent / CELL_PLAN_FILE)
        if isinstance(planned, dict):
            rec["plan"] = {k: planned.get(k) for k in ("peak_bytes", "peak_phase", "load_bytes", "samples_per_s",
                                                        "tokens_per_s", "batch_size", "gradient_checkpointing")}
    return rec


def _add_run_fields(rec: dict, run_dir: Path, parent_peak: Optional[int]) -> None:
    """What a finished run folder says: resolved recipe, metrics, parameters, memory, time."""
    metrics = read_json_or_none(run_dir / "metrics.json") or {}
    params = read_json_or_none(run_dir / "params.json") or {}
    res = read_json_or_none(run_dir / "resources.json") or {}
    resolved = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    if isinstance(resolved, dict):
        m = resolved.get("method") or {}
        rec["method"] = m.get("name", rec["method"])
        rec["method_options"] = {k: v for k, v in m.items() if k != "name"}
        rec["backbone"] = (resolved.get("backbone") or {}).get("name", rec["backbone"])
        rec["quantization"] = (resolved.get("backbone") or {}).get("quantization", rec["quantization"])
        rec["task"] = resolved.get("task", rec["task"])
        rec["resolved_recipe_hash"] = _hash({k: v for k, v in resolved.items() if k not in ("description", "output")})
        t = resolved.get("train") or {}
        rec["hyperparameters"] = {k: t.get(k) for k in ("lr", "head_lr", "epochs", "max_steps", "batch_size",
                                                         "grad_accum", "warmup_ratio", "scheduler", "weight_decay")}
    rec["metric"] = metrics.get("metric")
    rec["metric_mode"] = metrics.get("metric_mode", "max")  # "min" for loss-like metrics
    rec["dev"] = scalar_items(metrics.get("dev"), drop=("epoch", "step"))
    rec["test"] = scalar_items(metrics.get("test"), drop=("examples",))
    rec["best_epoch"] = metrics.get("best_epoch")
    rec["best_step"] = metrics.get("best_step")
    rec["steps"] = metrics.get("steps")
    rec["params"] = {k: params.get(k) for k in (
        "total_params", "backbone_params", "head_params", "trainable_params", "trainable_pct",
        "trainable_head_params", "trainable_params_without_head", "trainable_pct_without_head",
        "method_added_params")}
    # peft's own count (get_nb_trainable_parameters of the peft model) where the method builds one
    rec["params"]["peft_trainable_params"] = (params.get("peft_count") or {}).get("trainable")
    rec["size"] = {"model_dir_bytes": params.get("model_dir_bytes")}
    rec["memory"] = {
        "peak_rss_bytes": res.get("peak_rss_bytes"),
        "parent_peak_rss_bytes": parent_peak,
        "load_rss_bytes": res.get("load_rss_bytes"),
        "load_peak_rss_bytes": res.get("load_peak_rss_bytes"),
        "cuda_max_memory_allocated_bytes": res.get("cuda_max_memory_allocated_bytes"),
        "cuda_max_memory_reserved_bytes": res.get("cuda_max_memory_reserved_bytes"),
    }
    rec["time"] = {k: res.get(k) for k in (
        "train_time_s", "eval_time_s", "wall_time_s", "samples_per_s", "tokens_per_s", "train_samples",
        "train_tokens", "optimizer_steps", "processes", "threads_per_process", "device")}
