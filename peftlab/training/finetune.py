"""The training loop as one recipe class, the same for 1 or N processes, CPU or GPU::

    FineTuneRecipe(recipe).run() ->
      setup()            launch checks, data, backbone + method, the run folder, optimizer, loaders
      resume()           (with --resume) weights, optimizer, schedule, data position and RNG
      train_epoch() ...  steps; evaluate() on validation -> keep the best; save_checkpoint()
      finish()           restore the best, evaluate on test, write model/ and the JSON reports

Only rank 0 writes. Every file that marks a result as done is written atomically (runs.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import cpu_buffers
from .. import dropout as fast_dropout
from .._version import __version__
from ..backbones import check_max_length, load_tokenizer
from ..checkpoint import (latest_checkpoint, load_latest_checkpoint, optimizer_to_tensors, prune_checkpoints, restore_rng,
                          rng_tensors, save_checkpoint, shard_optimizer_state)
from ..errors import PeftlabError, TrainingError
from ..methods import load_trainable_state
from ..outputs import FolderLock
from ..recipe import Recipe
from ..runs import (BEST_DIR, CHECKPOINTS_DIR, RunLog, build_model, parameter_report, read_best, write_best,
                    write_error_reason, write_failure, write_results)
from ..sharded import any_nonfinite, is_sharded, whole
from ..system import TrimBeforeLargeBatches, current_rss_bytes, peak_rss_bytes, release_free_memory
from ..tasks import get_task_class
from ..util import scalar_items
from .auto import planned_config, write_plan
from .launch import (check_process_group, check_same_recipe, claim_run_dir, fsdp_wrap_layers, make_accelerator,
                     make_loaders, memory_settings, on_main_then_all, prepare_run_dir, run_sources, set_threads,
                     tracker_config)
from .optim import make_optimizer, make_scheduler
from .results import rank_fingerprints, run_resources
from .progress import LossMeter, ProgressBar
from .state import TrainState

log = logging.getLogger("peftlab")


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``recipe`` and write its run folder; returns the content of metrics.json."""
    return FineTuneRecipe(recipe, resume=resume, overwrite=overwrite).run()


class FineTuneRecipe:
    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False):
        self.recipe, self.cfg = recipe, recipe.train
        self.resuming, self.overwrite = resume, overwrite
        self.run_dir = Path(recipe.output.dir)
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.state = TrainState()
        self.run_log = RunLog()
        self.lock = FolderLock(self.run_dir, "output.dir")
        self.bar = ProgressBar()
        self.pending_rng: Optional[dict] = None
        self.wall_start = time.perf_counter()

    def run(self) -> dict:
        try:
            self.setup()
            if self.resuming:
                self.resume()
            self.train()
            return self.finish()
        finally:
            self.bar.close()
            self.run_log.close()
            self.lock.release()

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step; nothing is written until the inputs have been checked."""
        self.accelerator = make_accelerator(self.recipe, self.run_dir)
        self.main = self.accelerator.is_main_process
        check_process_group(self.accelerator)
        self.threads = set_threads(self.accelerator, self.cfg.num_threads)
        mmap_note = memory_settings(self.accelerator, self.cfg.cpu_mmap_threshold_mb)
        self.trim = TrimBeforeLargeBatches(self.accelerator.device.type == "cpu")
        on_main_then_all(self.accelerator, self.lock.probe)  # another run writing there: say so before loading anything
        prepare_run_dir(self.run_dir, self.resuming, self.overwrite, run_sources(self.recipe))
        if self.resuming:
            check_same_recipe(self.run_dir, self.recipe)
        from accelerate.utils import set_seed

        self.cfg, self.plan = planned_config(self.recipe, self.run_dir, self.resuming, self.accelerator)
        set_seed(self.cfg.seed)
        self._setup_data()
        self._setup_model()
        self._create_run_dir()
        self._log_start(mmap_note)
        self._setup_optimization()

    def _setup_data(self) -> None:
        task = self.task = get_task_class(self.recipe.task)(self.recipe)
        self.metric = task.check_metric(self.cfg.metric)
        self.mode = task.metric_mode(self.metric)
        self.splits = task.load_splits()
        self.tokenizer = load_tokenizer(self.recipe.backbone)
        check_max_length(self.recipe.backbone, self.recipe.data.max_length)
        self.encoded = {"train": task.encode(self.splits.train, self.tokenizer, "train")}
        self.encoded["validation"] = task.encode(self.splits.validation, self.tokenizer, "validation")
        if self.splits.test is not None:
            self.encoded["test"] = task.encode(self.splits.test, self.tokenizer, "test")

    def _setup_model(self) -> None:
        self.built = self._build_model()
        self.model, self.method, self.ctx = self.built.model, self.built.method, self.built.ctx
        self.fast_dropouts = fast_dropout.install_for_run(self.model, self.cfg.cpu_fast_dropout, self.accelerator.device)
        if self.cfg.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = parameter_report(self.built)
        self.load_rss, self.load_peak = current_rss_bytes(), peak_rss_bytes()

    def _create_run_dir(self) -> None:
        """Rank 0 takes the folder's lock, checks it again under the lock (another run may have
        written meanwhile), clears what --overwrite replaces and writes the run's first files; an
        error there is raised on every rank."""
        def claim() -> None:
            if claim_run_dir(self.run_dir, self.recipe, self.task.labels, self.lock, self.run_log,
                             resuming=self.resuming, overwrite=self.overwrite):
                log.info("output.dir: %s held a run that stopped before its first checkpoint; replaced", self.run_dir)

        on_main_then_all(self.accelerator, claim)
        write_plan(self.run_dir, self.plan if self.main else None)
        self.accelerator.wait_for_everyone()

    def _log_start(self, mmap_note: Optional[str]) -> None:
        acc, splits, p = self.accelerator, self.splits, self.params
        log.info("peftlab %s | recipe %s | method %s | %d process(es) on %s, %d thread(s) each",
                 __version__, self.recipe.source, self.method.name, acc.num_processes, acc.device.type, self.threads)
        if mmap_note:
            log.info("%s", mmap_note)
        if self.fast_dropouts:
            log.info("dropout: %d layers draw integer-bit masks (train.cpu_fast_dropout)", self.fast_dropouts)
        for note in splits.notes:
            log.info("data: %s", note)
        labels = f", {len(self.task.labels)} labels" if self.task.has_labels else ""
        log.info("data: %d train / %d validation / %s test examples%s", len(splits.train),
                 len(splits.validation), len(splits.test) if splits.test else "no", labels)
        log.info("params: %s trainable of %s (%.3f%%; without the head %s = %.3f%%)",
                 f"{p['trainable_params']:,}", f"{p['total_params']:,}", p["trainable_pct"],
                 f"{p['trainable_params_without_head']:,}", p["trainable_pct_without_head"])

    def _setup_optimization(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.trainable = self.method.trainable_parameters(self.model)
        if not self.trainable:
            raise TrainingError(f"method '{self.method.name}' left no trainable parameters")
        optimizer = make_optimizer(self.model, self.trainable, self.recipe, self.ctx.head_names)
        for split in [s for s in self.encoded if s != "train"]:
            self.encoded[split] = self.encoded[split].sorted_by_length()  # evaluation batches by length
        train_dl, eval_dls = make_loaders(self.encoded, self.task.collator(self.tokenizer), cfg, acc.num_processes)
        fsdp_wrap_layers(acc, self.model)
        self.model, self.optimizer, self.train_dl = acc.prepare(self.model, optimizer, train_dl)
        self.sharded = any(is_sharded(p) for p in self.model.parameters())
        self.trainable = self.method.trainable_parameters(self.unwrapped())  # FSDP swapped in sharded ones
        self.eval_dls = {split: acc.prepare(dl) for split, dl in eval_dls.items()}
        self.steps_per_epoch = max(1, math.ceil(len(self.train_dl) / cfg.grad_accum))
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler, warmup = make_scheduler(self.optimizer, self.recipe, self.total_steps)
        self.state.processes = acc.num_processes
        log.info("schedule: %d steps (%d epoch(s) x %d), warmup %d, %s decay, lr %g, batch %d x %d accum x %d proc%s, "
                 "AdamW (%s)", self.total_steps, self.n_epochs, self.steps_per_epoch, warmup, cfg.scheduler, cfg.lr,
                 cfg.batch_size, cfg.grad_accum, acc.num_processes, " sharded (FSDP2)" if self.sharded else "",
                 "fused" if self.optimizer.param_groups[0].get("fused") else "per-tensor loop")
        if acc.trackers:
            acc.init_trackers("peftlab", config=tracker_config(self.recipe))

    # ----------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue from the newest readable checkpoint: weights, optimizer, schedule, position, RNG."""
        acc = self.accelerator
        ckpt_path, ckpt, problems = load_latest_checkpoint(self.ckpt_dir)
        if ckpt_path is None or ckpt is None:
            raise PeftlabError(f"--resume: no readable checkpoint in {self.ckpt_dir} ({'; '.join(problems)})")
        saved = dict(ckpt["state"])
        saved_procs = int(saved.get("processes", ckpt["rng"]["torch_cpu"].shape[0]))
        if saved_procs != acc.num_processes:
            raise PeftlabError(
                f"--resume: {ckpt_path} was written by {saved_procs} process(es), this launch has "
                f"{acc.num_processes}; the data position and random state are per process: "
                f"resume with --num_processes {saved_procs}"
            )
        load_trainable_state(acc.unwrap_model(self.model), ckpt["trainable"], str(ckpt_path))
        self.optimizer.load_state_dict(shard_optimizer_state(ckpt["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        self.loss_pending = saved.pop("loss_pending", None)
        self.state = TrainState.from_dict(saved)
        self.pending_rng = ckpt["rng"]
        if self.main:  # the best model as it was at this checkpoint, not one from later in the interrupted run
            if ckpt["best"] is not None:
                write_best(self.ckpt_dir / BEST_DIR, ckpt["best"], self.state, self.metric)
            elif self.state.best is None:
                shutil.rmtree(self.ckpt_dir / BEST_DIR, ignore_errors=True)
        acc.wait_for_everyone()
        s = self.state
        log.info("resume: from %s (step %d, epoch %d, %d batches into it)%s", ckpt_path.name, s.step, s.epoch + 1,
                 s.batches_done, f"; skipped unreadable {', '.join(problems)}" if problems else "")

    # ------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """Every epoch to the end of the schedule (or early stopping), then a last evaluation."""
        self.bar.open(self.main, self.total_steps, self.state.step)
        self.model.train()
        self.loss = LossMeter(self.accelerator, getattr(self, "loss_pending", None))
        stop = self.state.step >= self.total_steps
        for epoch in range(self.state.epoch, self.n_epochs):
            if stop:
                break
            stop = self.train_epoch(epoch)
        if not self.state.history or self.state.history[-1]["step"] != self.state.step:
            self.evaluate()  # max_steps or eval_steps ended the run between evaluations
        self.bar.close()

    def train_epoch(self, epoch: int) -> bool:
        """One epoch (from where a resumed run stopped); returns True when training should stop."""
        s, acc = self.state, self.accelerator
        s.epoch = epoch
        self.train_dl.set_epoch(epoch)
        skip = s.batches_done
        batches = iter(acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl)
        if self.pending_rng is not None:  # after the iterator exists: its creation may draw random numbers
            restore_rng(self.pending_rng, acc)
            self.pending_rng = None
        self._t_batch = time.perf_counter()
        for window in self._windows(batches):
            items = self._global_items(window)
            for i, batch in enumerate(window):
                stop = self.step(batch, items, last=i == len(window) - 1)
                self._t_batch = time.perf_counter()  # evaluation and checkpoints are not training time
                if stop:
                    return True
        stop = self.evaluate() if self.cfg.eval_steps is None else False  # the epoch ran to its end
        s.epoch, s.batches_done = epoch + 1, 0
        if not stop:
            self.save_checkpoint()
        return stop

    def _windows(self, batches: Any) -> Any:
        """The epoch's batches in accumulation windows of train.grad_accum (the last may be shorter)."""
        window: list = []
        for batch in batches:
            window.append(batch)
            if len(window) == self.cfg.grad_accum:
                yield window
                window = []
        if window:
            yield window

    def _global_items(self, window: list) -> torch.Tensor:
        """Loss items (target tokens, examples) in the window on every process together."""
        items = torch.tensor(float(sum(self.task.count_items(b) for b in window)), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            items = self.accelerator.reduce(items, "sum")
        return items.clamp(min=1)

    def step(self, batch: dict, items: torch.Tensor, last: bool) -> bool:
        """One micro-batch; an optimizer step after the ``last`` of its window. True: stop training.

        The loss is the sum over the batch's items divided by the items of the whole window on every
        process (times the process count, which DDP's gradient mean divides by again), so a short
        batch weighs what its tokens weigh, as in one big batch of the same examples."""
        s, acc, cfg = self.state, self.accelerator, self.cfg
        self.trim.before(max(t.numel() for t in batch.values() if isinstance(t, torch.Tensor)))
        with contextlib.nullcontext() if last else acc.no_sync(self.model):
            loss_sum = self.task.loss_sum(self.model, batch)
            loss = loss_sum * acc.num_processes / items
            self._check_loss(loss)
            acc.backward(loss)
        if last:
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        s.batches_done += 1
        self._count(batch, loss_sum)
        s.train_time += time.perf_counter() - self._t_batch  # from the end of the last step: loading included
        if not last:
            return False
        self.scheduler.step()
        s.step += 1
        self.bar.update()
        if s.step % cfg.log_every == 0 or s.step == self.total_steps:
            self._log_loss()
        stop = bool(cfg.eval_steps and s.step % cfg.eval_steps == 0) and self.evaluate()
        if stop or s.step >= self.total_steps:
            return True
        # (at the epoch's last batch the end-of-epoch checkpoint follows the evaluation)
        if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.batches_done < len(self.train_dl):
            self.save_checkpoint()
        return False

    def _check_loss(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item() > 0:
            value = loss.item()
            what = f"loss is {value}" if not math.isfinite(value) else "another process's loss is not finite"
            self._stop(f"train: {what} at step {self.state.step + 1} (epoch {self.state.epoch + 1}); training "
                       f"stopped. Last good checkpoint: {latest_checkpoint(self.ckpt_dir) or 'none yet'}. "
                       f"Lower train.lr or check the data")

    def _count(self, batch: dict, loss_sum: torch.Tensor) -> None:
        self.loss.add(loss_sum, self.task.count_items(batch))
        n = self.accelerator.num_processes
        self.state.samples += int(batch["input_ids"].shape[0]) * n
        mask = batch.get("attention_mask")
        self.state.tokens += (int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())) * n

    def _log_loss(self) -> None:
        s, acc = self.state, self.accelerator
        mean_loss = self.loss.mean()  # over every target item since the last log line, every rank
        lr = self.scheduler.get_last_lr()[0]
        acc.log({"train/loss": mean_loss, "train/lr": lr}, step=s.step)
        self.bar.update(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        log.log(logging.DEBUG if self.bar.shown else logging.INFO,
                "step %d/%d: loss %.4f, lr %.3e", s.step, self.total_steps, mean_loss, lr)
        s.loss_log.append([s.step, round(mean_loss, 6)])

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> bool:
        """Validation pass; keeps the best model. Returns True when training should stop early."""
        s = self.state
        t0 = time.perf_counter()
        _release_step_memory()
        with self.bar.evaluating(self.eval_dls["validation"], "eval") as batches:
            metrics = self.task.evaluate(self.model, batches, self.accelerator, self.encoded["validation"])
        s.eval_time += time.perf_counter() - t0
        self.model.train()
        value = metrics[self.metric]
        improved = s.improved(value, self.mode)
        s.history.append({"epoch": s.epoch + 1, "step": s.step, **scalar_items(metrics)})
        self.run_log.evaluation({**s.history[-1], "selection": {"metric": self.metric, "mode": self.mode, "value": value}})
        if improved:
            self._check_finite("best model")
            s.best, s.best_step, s.best_epoch, s.bad_evals = value, s.step, s.epoch + 1, 0
            best = self.trainable_state()  # every process: FSDP gathers the shards
            if self.main:
                self._guard_write(self.ckpt_dir / BEST_DIR, lambda: write_best(self.ckpt_dir / BEST_DIR, best, s, self.metric))
            self.accelerator.wait_for_everyone()
        else:
            s.bad_evals += 1
        self.accelerator.log({f"dev/{k}": v for k, v in scalar_items(metrics).items()}, step=s.step)
        log.info("eval  epoch %d step %d: dev %s %.4f%s (loss %.4f)", s.epoch + 1, s.step, self.metric, value,
                 " *best*" if improved else "", metrics.get("loss", float("nan")))
        patience = self.cfg.early_stopping_patience
        if patience is not None and s.bad_evals >= patience:
            log.info("early stopping: no improvement in %d evaluation(s)", patience)
            return True
        return False

    # -------------------------------------------------------------------------- save_checkpoint
    def save_checkpoint(self) -> None:
        """A resumable checkpoint of the current step (rank 0 writes; every rank's RNG and loss in it)."""
        self._check_finite("checkpoint")
        acc, s = self.accelerator, self.state
        rng = rng_tensors(acc)
        pending = self.loss.pending()  # every rank's loss of the open log interval
        trainable, optimizer = self.trainable_state(), optimizer_to_tensors(self.optimizer, keep=self.main)
        if self.main:
            folder = self.ckpt_dir / f"step-{s.step:06d}"
            extra = {"scheduler": self.scheduler.state_dict(), "loss_pending": pending}
            self._guard_write(folder, lambda: save_checkpoint(
                folder, trainable, optimizer, rng, {**s.to_dict(), **extra},
                best_file=self.ckpt_dir / BEST_DIR / "trainable.safetensors"))
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def _guard_write(self, target: Path, write: Any) -> None:
        """Run ``write``; a full disk or a permission error stops training naming the last good checkpoint."""
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - a failed write (the previous checkpoint is intact)
            if write_error_reason(exc) is None:
                raise
            self.bar.close()
            raise write_failure(exc, target, f"training stopped at step {self.state.step}", self.ckpt_dir,
                                self.run_log) from None

    def _check_finite(self, what: str) -> None:
        """Never save non-finite weights as a checkpoint or as the best model (same on every rank)."""
        bad = any_nonfinite(self.trainable.items())
        if self.sharded:  # each process sees its own shards
            flags = self.accelerator.gather(torch.tensor([bad is not None], device=self.accelerator.device))
            bad = bad or ("a parameter of another process" if bool(flags.any()) else None)
        if bad:
            s = self.state
            self._stop(f"train: weights became non-finite (nan/inf in {bad}) at step {s.step} "
                       f"(epoch {s.epoch + 1}); {what} not saved, training stopped. Last good checkpoint: "
                       f"{latest_checkpoint(self.ckpt_dir) or 'none yet'}. Lower train.lr or check the data")

    def _stop(self, message: str) -> None:
        self.bar.close()  # the error is the last line the user sees
        self.run_log.record_failure(message)
        raise TrainingError(message)

    # ----------------------------------------------------------------------------------- finish
    def finish(self) -> dict:
        """Restore the best model, test it, check the processes agree, write model/ and the reports."""
        acc, s = self.accelerator, self.state
        acc.wait_for_everyone()
        self.optimizer.state.clear()  # training is over (its checkpoints are written): free AdamW's two copies
        load_trainable_state(self.unwrapped(), read_best(self.ckpt_dir / BEST_DIR), "best model")
        test_metrics = self._test()
        fingerprints = rank_fingerprints(self.accelerator, self.trainable_state(), self.sharded)
        results = {
            "task": self.task.name, "method": self.method.name, "metric": self.metric, "metric_mode": self.mode,
            "best_step": s.best_step, "best_epoch": s.best_epoch, "steps": s.step,
            "dev": next(h for h in s.history if h["step"] == s.best_step), "test": test_metrics,
            "history": s.history, "train_loss": s.loss_log,
        }
        resources = run_resources(self.accelerator, s, fingerprints, load=(self.load_rss, self.load_peak),  # a collective
                                  wall_start=self.wall_start, threads=self.threads, resumed=self.resuming)
        if self.main:
            write_results(self.run_dir, self._export_model(), self.built, self.tokenizer, self.recipe, self.params,
                          resources, results, self.run_log)
            log.info("done: %s (dev %s %.4f at epoch %s%s)", self.run_dir, self.metric, s.best, s.best_epoch,
                     f"; test {self.metric} {test_metrics[self.metric]:.4f}" if test_metrics else "")
        acc.wait_for_everyone()
        self._end_processes()
        return results

    def _end_processes(self) -> None:
        """End the process group while Python is whole: DDP's reducer holds it, and a gloo group left to
        interpreter shutdown can abort the process after a finished run (terminate without an active exception)."""
        self.model = self.unwrapped()
        self.accelerator.free_memory()  # accelerate's own references to the prepared model, optimizer, loaders
        gc.collect()
        self.accelerator.end_training()  # destroy_process_group

    def _test(self) -> Optional[dict]:
        if "test" not in self.eval_dls:
            return None
        t0 = time.perf_counter()
        _release_step_memory()
        self.task.use_dev_metrics(next(h for h in self.state.history if h["step"] == self.state.best_step))
        metrics = self.task.evaluate(self.model, self.eval_dls["test"], self.accelerator, self.encoded["test"])
        self.state.eval_time += time.perf_counter() - t0
        log.info("test (best model, step %d): %s", self.state.best_step,
                 ", ".join(f"{k} {v:.4f}" for k, v in scalar_items(metrics).items() if k != "examples"))
        return metrics

    def _export_model(self) -> Any:
        """The model that model/ is written from. FSDP: the shards are not a model that saves as one,
        so rank 0 builds the recipe's model again and loads the best weights into it."""
        if not self.sharded:
            return self.unwrapped()
        built = self._build_model()
        load_trainable_state(built.model, read_best(self.ckpt_dir / BEST_DIR), "best model")
        return built.model

    # ---------------------------------------------------------------------------------- helpers
    def _build_model(self) -> Any:
        """The recipe's backbone + head + method; a quantized one on the run's device (bitsandbytes
        quantizes there), a float one on the CPU until accelerate places it."""
        quantized = self.recipe.backbone.quantization != "none"
        return build_model(self.recipe, self.task, self.tokenizer, device=self.accelerator.device if quantized else None)

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole (FSDP shards gathered: every process calls this; only rank 0 keeps them)."""
        if not self.sharded:
            return {n: p.detach() for n, p in self.trainable.items()}
        state = {n: whole(p, keep=self.main) for n, p in self.trainable.items()}
        return {n: t for n, t in state.items() if t is not None}


def _release_step_memory() -> None:
    """Evaluation starts from the memory alive: the training step's pooled buffers and glibc's heap go."""
    cpu_buffers.release()
    release_free_memory()
