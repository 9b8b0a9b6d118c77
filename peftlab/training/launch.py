"""Before training starts: the accelerator (FSDP included), the process group, threads, the loaders,
the run folder's state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..atomicio import remove_stale_temporaries, write_json, write_text
from ..checkpoint import latest_checkpoint
from ..errors import PeftlabError, TrainingError
from ..outputs import RUN_HEADER, FolderLock, check_output, clear, made_by_peftlab, mark
from ..recipe import Recipe
from ..runs import CHECKPOINTS_DIR, RunLog, write_error_reason, write_failure
from ..system import run_threads, set_mmap_threshold
from ..tasks import LengthGroupedEpochSampler


def make_accelerator(recipe: Recipe, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    trackers = None
    if recipe.train.trackers == "tensorboard" or (
        recipe.train.trackers == "auto" and _has_tensorboard()
    ):
        trackers = "tensorboard"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise PeftlabError(
            "launch: DeepSpeed is not supported by peftlab's training loop (ZeRO checkpoints are pickled files, "
            "which peftlab never loads); shard with FSDP2 instead: configs/accelerate/fsdp2_gpus.yaml")
    fsdp = _fsdp_plugin()
    accelerator = Accelerator(  # gradient accumulation is the recipe class's (token-weighted over the window)
        mixed_precision=recipe.train.mixed_precision,
        log_with=trackers,
        project_dir=str(run_dir / "logs"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        fsdp_plugin=fsdp,
    )
    if fsdp is not None:
        _fsdp_on_cpu(accelerator, fsdp)
    return accelerator


def _fsdp_plugin() -> Any:
    """The FSDP settings of an ``accelerate launch`` with an FSDP config (accelerate passes them in the environment)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def _fsdp_on_cpu(accelerator: Any, plugin: Any) -> None:
    """accelerate turns an FSDP launch on CPU processes into plain DDP (its FSDP branch lists GPU
    kinds only). FSDP2 itself runs on gloo, so peftlab sets the distributed type and the 1-D device
    mesh that accelerate builds on GPUs; accelerate's own FSDP2 code then shards the model."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return  # GPUs: accelerate's own path; one process: nothing to shard
    if plugin.fsdp_version != 2:
        raise PeftlabError("launch: FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
                           "(FSDP1 runs on GPUs only)")
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.parallelism_config = ParallelismConfig(dp_shard_size=accelerator.num_processes)
    state.device_mesh = state.parallelism_config.get_device_mesh("cpu")


def fsdp_wrap_layers(accelerator: Any, model: Any) -> None:
    """Shard by transformer layer: with TRANSFORMER_BASED_WRAP and no class named, accelerate takes
    the model's ``_no_split_modules``, which for BERT-like models includes the embeddings block, and
    then shards the word embeddings a second time (a crash). Take the layers only."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if not getattr(accelerator, "is_fsdp2", False) or plugin is None or plugin.transformer_cls_names_to_wrap:
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    owners = {type(m).__name__ for m in model.modules()
              if embeddings is not None and any(sub is embeddings for sub in m.modules())}
    plugin.transformer_cls_names_to_wrap = [n for n in getattr(model, "_no_split_modules", None) or []
                                            if n not in owners]


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
    """On CPU use all cores, split between the processes on this machine (accelerate sets 1), or
    ``PEFTLAB_NUM_THREADS`` when set (a bench or sweep running several cells on one machine sets it)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
    n = run_threads(num_threads, local)
    torch.set_num_threads(n)
    return n


def run_sources(recipe: Recipe) -> list[tuple[Path, str]]:
    """What a run reads from disk, which its output folder must never hold (--overwrite would delete it)."""
    sources = [(Path(recipe.source), "the recipe")] if Path(recipe.source).is_file() else []
    if recipe.data.hub is None:
        for key in ("train", "validation", "test"):
            value = getattr(recipe.data, key)
            if value and Path(value).expanduser().exists():
                sources.append((Path(value).expanduser(), f"the data file data.{key}"))
    if Path(recipe.backbone.name).expanduser().is_dir():
        sources.append((Path(recipe.backbone.name).expanduser(), "the backbone"))
    return sources


def _stopped_before_first_checkpoint(run_dir: Path) -> bool:
    """A run folder of peftlab's with no results and no checkpoint: nothing in it to resume or keep."""
    return (run_dir.is_dir() and made_by_peftlab(run_dir) and not (run_dir / "metrics.json").exists()
            and latest_checkpoint(run_dir / CHECKPOINTS_DIR) is None)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, sources: Sequence[tuple[Path, str]] = ()) -> bool:
    """Refuse an output folder that holds files, unless resuming or overwriting one peftlab made, and
    any that holds what the run reads. True: the folder holds a run that stopped before its first
    checkpoint, which a new run replaces without --overwrite."""
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
                f"first one; set train.checkpoint_every to save more often); run without --resume to start again"
            )
        return False
    failed = _stopped_before_first_checkpoint(run_dir)
    check_output(run_dir, "output.dir", overwrite or failed, sources,
                 hint="pass --resume to continue that run or --overwrite to replace it")
    return failed and not overwrite


def claim_run_dir(run_dir: Path, recipe: Recipe, labels: list, lock: FolderLock, run_log: RunLog, *,
                  resuming: bool, overwrite: bool) -> bool:
    """Rank 0, after every input was checked: take the folder's lock, check the folder again under it
    (another run may have written meanwhile), clear what is replaced, write the run's first files.
    True: it replaced a run that stopped before its first checkpoint. A failed write is one line."""
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        replace = prepare_run_dir(run_dir, resuming, overwrite, run_sources(recipe))
        if replace or overwrite:
            clear(run_dir)
        remove_stale_temporaries(run_dir)
        remove_stale_temporaries(ckpt_dir)
        if not resuming:
            mark(run_dir, "run")
            write_text(run_dir / "recipe.yaml", f"{RUN_HEADER} {recipe.source})\n" + recipe.to_yaml())
            write_json(run_dir / "labels.json", labels)
        run_log.open(run_dir / "train.log")
    except Exception as exc:  # noqa: BLE001 - a failed write becomes the one-line error
        if write_error_reason(exc) is None:
            raise
        raise write_failure(exc, run_dir, "the run folder could not be written", ckpt_dir, run_log) from None
    return replace


def on_main_then_all(accelerator: Any, fn: Any) -> None:
    """Run ``fn`` on rank 0; a PeftlabError it raises is raised on every rank (not a hang)."""
    error = None
    if accelerator.is_main_process:
        try:
            fn()
        except PeftlabError as exc:
            error = (str(exc), exc.exit_code)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise (TrainingError if error[1] == TrainingError.exit_code else PeftlabError)(error[0])


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


def weight_fingerprint(params: dict[str, torch.Tensor], chunk: int = 1 << 20) -> list[float]:
    """Two float64 sums of the weights (plain and |w| weighted by position), a million values at a time
    so that no temporary the size of a weight matrix is made: every process must end with the same."""
    total, weighted = 0.0, 0.0
    for i, name in enumerate(sorted(params)):
        for part in params[name].detach().reshape(-1).split(chunk):
            total += float(part.sum(dtype=torch.float64))
            weighted += (i + 1) * float(part.abs().sum(dtype=torch.float64))
    return [total, weighted]


def memory_settings(accelerator: Any, mb: Optional[float]) -> Optional[str]:
    """train.cpu_mmap_threshold_mb on CPU; the line to log about it, if any."""
    if not mb or accelerator.device.type != "cpu":
        return None
    if set_mmap_threshold(mb):
        return f"memory: glibc mmap threshold fixed at {mb:g} MiB"
    return "memory: train.cpu_mmap_threshold_mb ignored (no glibc mallopt here)"


def make_loaders(encoded: dict, collate: Any, cfg: Any, processes: int) -> tuple[DataLoader, dict[str, DataLoader]]:
    """The training loader (length-grouped or shuffled, seeded) and one loader per evaluation split."""
    train = encoded["train"]
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.group_by_length:
        sampler = LengthGroupedEpochSampler(train.lengths(), cfg.batch_size * processes, cfg.seed)
        train_dl = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, generator=generator)
    else:
        train_dl = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    eval_dls = {split: DataLoader(data, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate)
                for split, data in encoded.items() if split != "train"}
    return train_dl, eval_dls
