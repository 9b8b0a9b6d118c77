"""Before training starts: the accelerator, the process group, threads, the run folder's state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import latest_checkpoint
from ..errors import PeftlabError, TrainingError
from ..recipe import Recipe
from ..runs import CHECKPOINTS_DIR
from ..system import cpu_cores


def make_accelerator(recipe: Recipe, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    trackers = None
    if recipe.train.trackers == "tensorboard" or (
        recipe.train.trackers == "auto" and _has_tensorboard()
    ):
        trackers = "tensorboard"
    return Accelerator(
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=recipe.train.mixed_precision,
        log_with=trackers,
        project_dir=str(run_dir / "logs"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def check_process_group(accelerator: Any) -> None:
    """Stop a multi-process launch whose processes did not form a process group.

    ``accelerate launch --multi_gpu`` on a CPU machine without ``ACCELERATE_USE_CPU=1`` starts N
    processes that each train an independent replica and overwrite each other's output.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes != world:
        raise TrainingError(
            f"launch: {world} processes were started but they did not form a process group "
            f"(accelerate sees {accelerator.num_processes}); each would train its own replica. "
            f"On CPU use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {world} ...`"
        )


def set_threads(accelerator: Any, num_threads: Optional[int]) -> int:
    """On CPU use all cores, split between the processes on this machine (accelerate sets 1)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
    n = num_threads or max(1, cpu_cores() // max(local, 1))
    torch.set_num_threads(n)
    return n


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that already holds files, unless resuming or overwriting."""
    if resume and overwrite:
        raise PeftlabError("command line: --resume and --overwrite exclude each other")
    if resume:
        if (run_dir / "metrics.json").is_file():
            raise PeftlabError(
                f"--resume: {run_dir} is a finished run (metrics.json exists), there is nothing to resume; "
                f"pass --overwrite to train it again"
            )
        if latest_checkpoint(run_dir / CHECKPOINTS_DIR) is None:
            raise PeftlabError(
                f"--resume: no complete checkpoint in {run_dir / CHECKPOINTS_DIR} (the run stopped before its "
                f"first one; set train.checkpoint_every to save more often); pass --overwrite to start again"
            )
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise PeftlabError(
            f"output.dir: {run_dir} already holds files; pass --resume to continue that run or "
            f"--overwrite to replace it"
        )


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    import yaml

    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        raise PeftlabError(f"--resume: {saved_path} is missing")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    current = recipe.to_dict()
    for section in ("backbone", "task", "data", "method", "train"):
        if saved.get(section) != current.get(section):
            a, b = saved.get(section), current.get(section)
            key = section
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                key = f"{section}.{diff[0]}" if diff else section
            raise PeftlabError(
                f"--resume: {key} differs from the run's {saved_path}; resume with the same recipe and overrides"
            )


def tracker_config(recipe: Recipe) -> dict:
    flat: dict[str, Any] = {}
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    flat[f"{section}.{k}"] = v
        elif isinstance(values, (int, float, str, bool)):
            flat[section] = values
    return flat
