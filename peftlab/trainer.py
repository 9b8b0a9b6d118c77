"""The training loop: one readable function on accelerate, the same for 1 or N processes, CPU or GPU.

    train(recipe) ->
      check the launch, the run folder, the data and the backbone   (nothing written yet)
      build backbone + head, apply the method                        (methods/*.py)
      AdamW + warmup/decay schedule, accelerate.prepare
      for each epoch: train steps -> evaluate on validation -> keep the best -> checkpoint
      restore the best, evaluate on test, write model/ and the JSON reports (metrics.json last)

Only rank 0 writes. Every file that marks a result as done is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from . import __version__
from .atomicio import atomic_dir, remove_stale_temporaries, write_json, write_text
from .backbones import load_tokenizer
from .checkpoint import (
    latest_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from .errors import PeftlabError, TrainingError
from .methods import load_trainable_state, write_method_file
from .recipe import Recipe
from .runs import BEST_DIR, CHECKPOINTS_DIR, MODEL_DIR, build_model, is_head_parameter, parameter_report
from .tasks import LengthGroupedEpochSampler, get_task_class

log = logging.getLogger("peftlab")


# ------------------------------------------------------------------------------------ launching


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


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(accelerator: Any, num_threads: Optional[int]) -> int:
    """On CPU use all cores, split between the processes on this machine (accelerate sets 1)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
    n = num_threads or max(1, cpu_cores() // max(local, 1))
    torch.set_num_threads(n)
    return n


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def set_mmap_threshold(mb: float) -> bool:
    """Fix glibc's mmap threshold at ``mb`` MiB (freed large blocks are unmapped, not kept in the heap).

    glibc raises the threshold to the size of every mmapped block freed (up to 32 MiB), after which
    activation-sized tensors come from the heap and their memory stays resident once freed; a fixed
    threshold turns that off. Returns False where there is no glibc ``mallopt`` (nothing changes).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mb * 1024 * 1024)))
    except (OSError, AttributeError):
        return False


def setup_logging(accelerator: Any, log_file: Optional[Path] = None) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, "_peftlab", False):
            log.removeHandler(h)
            h.close()
    if not accelerator.is_main_process:
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler.setFormatter(logging.Formatter("[peftlab] %(message)s"))
    if log_file is not None:
        handler.setFormatter(fmt)
    handler._peftlab = True  # type: ignore[attr-defined]
    log.addHandler(handler)


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


# --------------------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        return peak_rss_bytes()


# ------------------------------------------------------------------------------------ optimizer


def make_optimizer(model: Any, trainable: dict[str, torch.nn.Parameter], recipe: Recipe, head_names: list[str]):
    cfg = recipe.train
    groups: dict[tuple, list] = {}
    for name, p in trainable.items():
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        lr = cfg.head_lr if (cfg.head_lr and is_head_parameter(name, head_names)) else cfg.lr
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items(), key=lambda kv: kv[0])
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, fused=cfg.fused_optimizer and fused_supported(trainable.values()))


def fused_supported(params: Any) -> bool:
    """True when torch has a fused AdamW kernel for every parameter (floating point, on a CPU, CUDA, ...
    device). The fused kernel updates every tensor in one pass, several times faster than torch's
    per-tensor loop over a full model's parameters on a CPU (benchmarks/optimizer_step.py); it is
    also what the transformers Trainer uses by default (``adamw_torch_fused``)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def make_scheduler(optimizer: Any, recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    cfg = recipe.train
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps), warmup


# ----------------------------------------------------------------------------------------- train


def _fingerprint(params: dict[str, torch.Tensor]) -> list[float]:
    total, weighted = 0.0, 0.0
    for i, name in enumerate(sorted(params)):
        v = params[name].detach().double()
        total += float(v.sum())
        weighted += float((v * (i + 1)).abs().sum())
    return [total, weighted]


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``recipe`` and write its run folder; returns the content of metrics.json."""
    cfg = recipe.train
    run_dir = Path(recipe.output.dir)
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    wall_start = time.perf_counter()

    # 1. Launch checks and input validation: nothing is written until all of this has passed.
    accelerator = make_accelerator(recipe, run_dir)
    main = accelerator.is_main_process
    setup_logging(accelerator)
    check_process_group(accelerator)
    threads = set_threads(accelerator, cfg.num_threads)
    mmap_note = None
    if cfg.cpu_mmap_threshold_mb and accelerator.device.type == "cpu":
        applied = set_mmap_threshold(cfg.cpu_mmap_threshold_mb)
        mmap_note = (f"memory: glibc mmap threshold fixed at {cfg.cpu_mmap_threshold_mb:g} MiB" if applied else
                     "memory: train.cpu_mmap_threshold_mb ignored (no glibc mallopt here)")
    prepare_run_dir(run_dir, resume, overwrite)
    if resume:
        _check_same_recipe(run_dir, recipe)

    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    task = get_task_class(recipe.task)(recipe)
    metric = task.check_metric(cfg.metric)
    mode = task.metric_mode(metric)
    splits = task.load_splits()
    tokenizer = load_tokenizer(recipe.backbone)
    encoded = {"train": task.encode(splits.train, tokenizer, "train")}
    encoded["validation"] = task.encode(splits.validation, tokenizer, "validation")
    if splits.test is not None:
        encoded["test"] = task.encode(splits.test, tokenizer, "test")

    quantized = recipe.backbone.quantization != "none"
    built = build_model(recipe, task, tokenizer, device=accelerator.device if quantized else None)
    model, method, ctx = built.model, built.method, built.ctx
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = parameter_report(built)
    load_rss = current_rss_bytes()
    load_peak = peak_rss_bytes()

    # 2. The run folder.
    if main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        remove_stale_temporaries(ckpt_dir)
        if not resume:
            write_text(run_dir / "recipe.yaml", f"# resolved recipe (source: {recipe.source})\n" + recipe.to_yaml())
            write_json(run_dir / "labels.json", task.labels)
    accelerator.wait_for_everyone()
    setup_logging(accelerator, run_dir / "train.log")
    if main:
        log.addHandler(_stderr_handler())
    log.info("peftlab %s | recipe %s | method %s | %d process(es) on %s, %d thread(s) each",
             __version__, recipe.source, method.name, accelerator.num_processes, accelerator.device.type, threads)
    if mmap_note:
        log.info("%s", mmap_note)
    for note in splits.notes:
        log.info("data: %s", note)
    log.info("data: %d train / %d validation / %s test examples, %d labels",
             len(splits.train), len(splits.validation), len(splits.test) if splits.test else "no", len(task.labels))
    log.info("params: %s trainable of %s (%.3f%%; without the head %s = %.3f%%)",
             f"{params['trainable_params']:,}", f"{params['total_params']:,}", params["trainable_pct"],
             f"{params['trainable_params_without_head']:,}", params["trainable_pct_without_head"])

    # 3. Optimizer, schedule, data loaders.
    trainable = method.trainable_parameters(model)
    if not trainable:
        raise TrainingError(f"method '{method.name}' left no trainable parameters")
    optimizer = make_optimizer(model, trainable, recipe, ctx.head_names)
    collate = task.collator(tokenizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.group_by_length:
        sampler = LengthGroupedEpochSampler(encoded["train"].lengths(), cfg.batch_size * accelerator.num_processes, cfg.seed)
        train_dl = DataLoader(encoded["train"], batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, generator=generator)
    else:
        train_dl = DataLoader(encoded["train"], batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    for split in [s for s in encoded if s != "train"]:
        encoded[split] = encoded[split].sorted_by_length()
    eval_dls = {
        split: DataLoader(encoded[split], batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate)
        for split in encoded if split != "train"
    }
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    for split in eval_dls:
        eval_dls[split] = accelerator.prepare(eval_dls[split])
    steps_per_epoch = max(1, math.ceil(len(train_dl) / cfg.grad_accum))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler, warmup = make_scheduler(optimizer, recipe, total_steps)
    log.info("schedule: %d steps (%d epoch(s) x %d), warmup %d, %s decay, lr %g, batch %d x %d accum x %d proc, "
             "AdamW (%s)", total_steps, n_epochs, steps_per_epoch, warmup, cfg.scheduler, cfg.lr, cfg.batch_size,
             cfg.grad_accum, accelerator.num_processes,
             "fused" if optimizer.param_groups[0].get("fused") else "per-tensor loop")

    state: dict[str, Any] = {
        "step": 0, "epoch": 0, "batches_done": 0, "best": None, "best_step": None, "best_epoch": None,
        "bad_evals": 0, "history": [], "train_time": 0.0, "eval_time": 0.0, "samples": 0, "tokens": 0,
        "processes": accelerator.num_processes,
    }
    pending_rng = None
    if resume:
        ckpt_path, ckpt, problems = load_latest_checkpoint(ckpt_dir)
        if ckpt_path is None or ckpt is None:
            raise PeftlabError(f"--resume: no readable checkpoint in {ckpt_dir} ({'; '.join(problems)})")
        saved_procs = int(ckpt["state"].get("processes", ckpt["rng"]["torch_cpu"].shape[0]))
        if saved_procs != accelerator.num_processes:
            raise PeftlabError(
                f"--resume: {ckpt_path} was written by {saved_procs} process(es), this launch has "
                f"{accelerator.num_processes}; the data position and random state are per process: "
                f"resume with --num_processes {saved_procs}"
            )
        load_trainable_state(accelerator.unwrap_model(model), ckpt["trainable"], str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["state"].pop("scheduler"))
        state.update(ckpt["state"])
        pending_rng = ckpt["rng"]
        if main:  # the best model as it was at this checkpoint, not one from later in the interrupted run
            if ckpt["best"] is not None:
                _write_best(ckpt_dir / BEST_DIR, ckpt["best"], state, metric)
            elif state["best"] is None:
                shutil.rmtree(ckpt_dir / BEST_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()
        log.info("resume: from %s (step %d, epoch %d, %d batches into it)%s",
                 ckpt_path.name, state["step"], state["epoch"] + 1, state["batches_done"],
                 f"; skipped unreadable {', '.join(problems)}" if problems else "")

    if accelerator.trackers:
        accelerator.init_trackers("peftlab", config=_tracker_config(recipe))

    def unwrapped() -> Any:
        return accelerator.unwrap_model(model)

    def trainable_state() -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in method.trainable_parameters(unwrapped()).items()}

    def check_finite(what: str) -> None:
        """Never save non-finite weights as a checkpoint or as the best model (same on every rank)."""
        bad = [n for n, p in trainable.items() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            last = latest_checkpoint(ckpt_dir)
            bar.close()  # the error is the last line the user sees
            message = (
                f"train: weights became non-finite (nan/inf in {bad[0]}) at step {state['step']} "
                f"(epoch {state['epoch'] + 1}); {what} not saved, training stopped. Last good checkpoint: "
                f"{last or 'none yet'}. Lower train.lr or check the data"
            )
            _record_failure(message)
            raise TrainingError(message)

    def checkpoint() -> None:
        check_finite("checkpoint")
        rng = rng_tensors(accelerator)
        # every rank's running loss of the current log interval (the logged mean is over all ranks)
        pending = torch.tensor([[float(loss_acc), float(loss_count)]], dtype=torch.float64, device=accelerator.device)
        pending = accelerator.gather(pending).cpu().tolist()
        if main:
            folder = ckpt_dir / f"step-{state['step']:06d}"
            extra = {"scheduler": scheduler.state_dict(), "loss_pending": pending}
            try:
                save_checkpoint(folder, trainable_state(), optimizer, rng, {**state, **extra},
                                best_file=ckpt_dir / BEST_DIR / "trainable.safetensors")
            except OSError as exc:  # full disk, quota, permissions: the previous checkpoint is intact
                bar.close()
                raise _write_failure(exc, folder, f"training stopped at step {state['step']}", ckpt_dir) from None
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    def evaluate() -> bool:
        """Validation pass; returns True when training should stop early."""
        t0 = time.perf_counter()
        metrics = task.evaluate(model, eval_dls["validation"], accelerator, encoded["validation"])
        state["eval_time"] += time.perf_counter() - t0
        model.train()
        value = metrics[metric]
        improved = state["best"] is None or (value > state["best"] if mode == "max" else value < state["best"])
        entry = {"epoch": state["epoch"] + 1, "step": state["step"], **_scalar_metrics(metrics)}
        state["history"].append(entry)
        if improved:
            check_finite("best model")
            state.update(best=value, best_step=state["step"], best_epoch=state["epoch"] + 1, bad_evals=0)
            if main:
                try:
                    _write_best(ckpt_dir / BEST_DIR, trainable_state(), state, metric)
                except OSError as exc:
                    bar.close()
                    raise _write_failure(exc, ckpt_dir / BEST_DIR, f"training stopped at step {state['step']}",
                                         ckpt_dir) from None
            accelerator.wait_for_everyone()
        else:
            state["bad_evals"] += 1
        accelerator.log({f"dev/{k}": v for k, v in _scalar_metrics(metrics).items()}, step=state["step"])
        log.info("eval  epoch %d step %d: dev %s %.4f%s (loss %.4f)", state["epoch"] + 1, state["step"], metric,
                 value, " *best*" if improved else "", metrics.get("loss", float("nan")))
        patience = cfg.early_stopping_patience
        if patience is not None and state["bad_evals"] >= patience:
            log.info("early stopping: no improvement in %d evaluation(s)", patience)
            return True
        return False

    # 4. The loop.
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not main, dynamic_ncols=True,
               file=sys.stderr, mininterval=2.0)
    model.train()
    stop = state["step"] >= total_steps
    loss_acc = torch.zeros((), device=accelerator.device)
    loss_count = 0
    if "loss_pending" in state:  # resumed: this rank's running loss of the interrupted log interval
        pending = state.pop("loss_pending")
        if pending and isinstance(pending[0], list):  # one [sum, count] per rank
            pending = pending[accelerator.process_index]
        loss_acc += pending[0]
        loss_count = int(pending[1])
    for epoch in range(state["epoch"], n_epochs):
        if stop:
            break
        state["epoch"] = epoch
        train_dl.set_epoch(epoch)
        skip = state["batches_done"]
        batches = iter(accelerator.skip_first_batches(train_dl, skip) if skip else train_dl)
        if pending_rng is not None:  # after the iterator exists: its creation may draw random numbers
            restore_rng(pending_rng, accelerator)
            pending_rng = None
        t_batch = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.training_loss(model, batch)
                bad = (~torch.isfinite(loss.detach())).float()
                if accelerator.num_processes > 1:
                    bad = accelerator.reduce(bad, "sum")
                if bad.item() > 0:
                    last = latest_checkpoint(ckpt_dir)
                    bar.close()  # the error is the last line the user sees
                    value = loss.item()
                    what = f"loss is {value}" if not math.isfinite(value) else "another process's loss is not finite"
                    message = (
                        f"train: {what} at step {state['step'] + 1} (epoch {epoch + 1}); "
                        f"training stopped. Last good checkpoint: {last or 'none yet'}. "
                        f"Lower train.lr or check the data"
                    )
                    _record_failure(message)
                    raise TrainingError(message)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["batches_done"] += 1
            loss_acc += loss.detach()
            loss_count += 1
            n_samples = int(batch["input_ids"].shape[0])
            n_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
            state["samples"] += n_samples * accelerator.num_processes
            state["tokens"] += n_tokens * accelerator.num_processes
            now = time.perf_counter()
            state["train_time"] += now - t_batch
            if not accelerator.sync_gradients:
                t_batch = time.perf_counter()
                continue
            scheduler.step()
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                mean_loss = float(accelerator.reduce(loss_acc / max(loss_count, 1), "mean"))
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=state["step"])
                log.debug("step %d loss %.4f lr %.3e", state["step"], mean_loss, lr)
                state.setdefault("loss_log", []).append([state["step"], round(mean_loss, 6)])
                loss_acc.zero_()
                loss_count = 0
            if cfg.eval_steps and state["step"] % cfg.eval_steps == 0:
                stop = evaluate()
            if state["step"] >= total_steps:
                stop = True
            if stop:
                break
            # (at the epoch's last batch the end-of-epoch checkpoint below follows the evaluation)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["batches_done"] < len(train_dl):
                checkpoint()
            t_batch = time.perf_counter()
        if stop:
            break
        # the epoch ran to its end
        if cfg.eval_steps is None:
            stop = evaluate()
        state["epoch"] = epoch + 1
        state["batches_done"] = 0
        if stop:
            break
        checkpoint()
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        evaluate()  # max_steps or eval_steps ended the run between evaluations
    bar.close()
    checkpoint_final = state["step"]

    # 5. The best model: restore it, test it, save it.
    accelerator.wait_for_everyone()
    from safetensors.torch import load_file

    load_trainable_state(unwrapped(), load_file(str(ckpt_dir / BEST_DIR / "trainable.safetensors")), "best model")
    best_entry = next(h for h in state["history"] if h["step"] == state["best_step"])
    test_metrics = None
    if "test" in eval_dls:
        t0 = time.perf_counter()
        test_metrics = task.evaluate(model, eval_dls["test"], accelerator, encoded["test"])
        state["eval_time"] += time.perf_counter() - t0
        log.info("test (best model, step %d): %s", state["best_step"],
                 ", ".join(f"{k} {v:.4f}" for k, v in _scalar_metrics(test_metrics).items() if k != "examples"))

    fingerprint = torch.tensor(_fingerprint(trainable_state()), dtype=torch.float64, device=accelerator.device)
    fingerprints = accelerator.gather(fingerprint.unsqueeze(0)).cpu().tolist()
    if any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for fp in fingerprints for a, b in zip(fp, fingerprints[0])):
        raise TrainingError(f"train: the {len(fingerprints)} processes ended with different weights {fingerprints}")

    peak = torch.tensor([peak_rss_bytes()], dtype=torch.float64, device=accelerator.device)
    peaks = accelerator.gather(peak).cpu().tolist()
    resources = {
        "peak_rss_bytes": int(max(peaks)),
        "peak_rss_bytes_per_rank": [int(p) for p in peaks],
        "load_rss_bytes": int(load_rss),
        "load_peak_rss_bytes": int(load_peak),
        "train_time_s": round(state["train_time"], 3),
        "eval_time_s": round(state["eval_time"], 3),
        "wall_time_s": round(time.perf_counter() - wall_start, 3),
        "train_samples": state["samples"],
        "train_tokens": state["tokens"],
        "samples_per_s": round(state["samples"] / state["train_time"], 3) if state["train_time"] else None,
        "tokens_per_s": round(state["tokens"] / state["train_time"], 3) if state["train_time"] else None,
        "optimizer_steps": state["step"],
        "processes": accelerator.num_processes,
        "threads_per_process": threads,
        "device": str(accelerator.device),
        "rank_weight_fingerprints": fingerprints,
        "resumed": bool(resume),
    }
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        resources["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(accelerator.device))
        resources["cuda_max_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(accelerator.device))
    results = {
        "task": task.name,
        "method": method.name,
        "metric": metric,
        "best_step": state["best_step"],
        "best_epoch": state["best_epoch"],
        "steps": checkpoint_final,
        "dev": best_entry,
        "test": test_metrics,
        "history": state["history"],
        "train_loss": state.get("loss_log", []),
    }
    if main:
        try:
            with atomic_dir(run_dir / MODEL_DIR) as tmp:
                method.save(unwrapped(), tmp, ctx)
                tokenizer.save_pretrained(str(tmp))
                write_method_file(tmp, method, recipe, task.labels, ctx.head_names)
            params["model_dir_bytes"] = sum(f.stat().st_size for f in (run_dir / MODEL_DIR).rglob("*") if f.is_file())
            write_json(run_dir / "params.json", params)
            write_json(run_dir / "resources.json", resources)
            write_json(run_dir / "metrics.json", results)  # last: marks the run as complete
        except OSError as exc:
            raise _write_failure(exc, run_dir, "training finished but its results were not saved", ckpt_dir) from None
        log.info("done: %s (dev %s %.4f at epoch %s%s)", run_dir, metric, state["best"], state["best_epoch"],
                 f"; test {metric} {test_metrics[metric]:.4f}" if test_metrics else "")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _record_failure(message: str) -> None:
    """Note in train.log why training stopped (stderr shows it once, as the CLI's error line)."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s", (message,), None))


def _write_failure(exc: OSError, target: Path, what: str, ckpt_dir: Path) -> TrainingError:
    last = latest_checkpoint(ckpt_dir)
    message = (
        f"output.dir: cannot write {target} ({exc.strerror or exc}); {what}. Last good checkpoint: "
        f"{last or 'none'}; free space (or fix permissions) and continue with --resume"
    )
    _record_failure(message)
    return TrainingError(message)


def _write_best(folder: Path, tensors: dict[str, torch.Tensor], state: dict, metric: str) -> None:
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        write_json(tmp / "best.json", {"step": state["best_step"], "epoch": state["best_epoch"], metric: state["best"]})


def _stderr_handler() -> logging.Handler:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("[peftlab] %(message)s"))
    h._peftlab = True  # type: ignore[attr-defined]
    return h


def _tracker_config(recipe: Recipe) -> dict:
    flat: dict[str, Any] = {}
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    flat[f"{section}.{k}"] = v
        elif isinstance(values, (int, float, str, bool)):
            flat[section] = values
    return flat


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
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
