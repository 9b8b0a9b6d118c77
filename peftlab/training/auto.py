"""``train.batch_size: auto``: the planner chooses the batch, accumulation, checkpointing and evaluation
batch that fit ``train.memory_budget`` before the run loads its model; a resumed run reuses its plan."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..atomicio import write_json
from ..errors import PeftlabError
from ..system import available_memory_bytes
from ..recipe import TrainConfig
from ..util import read_json_or_none

log = logging.getLogger("peftlab")
PLAN_FILE = "plan.json"
SETTINGS = ("batch_size", "grad_accum", "gradient_checkpointing", "eval_batch_size")


def planned_config(recipe: Any, run_dir: Path, resuming: bool, accelerator: Any) -> tuple[TrainConfig, Optional[dict]]:
    """The recipe's train config with ``auto`` resolved, and the plan to record (None when nothing was
    planned). Rank 0 plans; every process takes its settings."""
    cfg = recipe.train
    if cfg.batch_size != "auto":
        return cfg, None
    saved = read_json_or_none(run_dir / PLAN_FILE) if resuming else None
    if saved is not None:
        log.info("plan: resumed with %s", _describe(saved["settings"]))
        return cfg.model_copy(update=saved["settings"]), None
    plan = None
    if accelerator.is_main_process:
        try:
            plan = _plan(recipe, accelerator)
        except PeftlabError as exc:  # every process stops with the same line, none waits for the others
            plan = {"error": str(exc)}
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        plan = broadcast_object_list([plan])[0]
    if "error" in plan:
        raise PeftlabError(plan["error"])
    log.info("plan: %s; predicted peak %.0f MiB of %.0f MiB", _describe(plan["settings"]),
             plan["peak_bytes"] / 2**20, plan["budget_bytes"] / 2**20)
    return cfg.model_copy(update=plan["settings"]), plan


def _plan(recipe: Any, accelerator: Any) -> dict:
    """``peftlab plan --fit`` in a child process: its traces and its copy of the data never add to this
    run's memory, and it measures the memory a fresh process needs before the model, as this run's was."""
    with tempfile.TemporaryDirectory(prefix="peftlab-plan-") as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(recipe.to_yaml(), encoding="utf-8")
        cmd = [sys.executable, "-m", "peftlab.cli", "plan", str(path), "--fit", "--json",
               "--device", accelerator.device.type]
        budget = recipe.train.memory_budget
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        if budget is None and local > 1 and accelerator.device.type == "cpu":  # the processes share this RAM
            budget = available_memory_bytes() // local
        if budget is not None:
            cmd += ["--memory", str(budget)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("peftlab: error: ") if lines else f"exit status {done.returncode}"
        raise PeftlabError(f"train.batch_size: auto: {reason}")
    record = json.loads(done.stdout)
    record["recipe"] = recipe.source
    record["settings"] = {k: record[k] for k in SETTINGS}
    return record


def write_plan(run_dir: Path, plan: Optional[dict]) -> None:
    if plan is not None:
        write_json(run_dir / PLAN_FILE, plan)


def _describe(settings: dict) -> str:
    return (f"batch {settings['batch_size']} x {settings['grad_accum']} accum, eval batch "
            f"{settings['eval_batch_size']}, gradient checkpointing {'on' if settings['gradient_checkpointing'] else 'off'}")
