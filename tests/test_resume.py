"""Checkpoints and --resume: a run killed with SIGKILL (after a checkpoint, or while writing one) and
resumed reaches exactly the weights and metrics.json of the same recipe run without interruption.

Real CLI subprocesses on the tiny BERT with real WNUT-17 slices (96 train sentences = 6 batches of 16
per epoch), LoRA and BERT dropout active, one thread (bit-for-bit reproducible on CPU).
Faults are injected from outside peftlab with tests/fault_shim/sitecustomize.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import peftlab
from conftest import ROOT, ner_recipe, run_cli
from peftlab.checkpoint import latest_checkpoint, list_checkpoints
from peftlab.errors import PeftlabError

SHIM = Path(__file__).resolve().parent / "fault_shim"
TOL = 1e-6

# 3 epochs x 6 batches = 18 steps; checkpoints at 4 (mid), 6 (epoch end), 8 (mid), 12 (end), 16 (mid).
KILL_TRAIN = dict(
    epochs=3, lr=1e-2, metric="loss", checkpoint_every=4, keep_checkpoints=2, log_every=3, num_threads=1,
)
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}


# ------------------------------------------------------------------------------------- helpers


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def start_train(recipe_path: Path, *args: str, fault: str | None = None, marker: Path | None = None,
                log: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM), env.get("PYTHONPATH")]))
    env.pop("PEFTLAB_TEST_FAULT", None)
    if fault:
        env["PEFTLAB_TEST_FAULT"] = fault
    if marker:
        env["PEFTLAB_TEST_MARKER"] = str(marker)
    err = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", str(recipe_path), *args],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if log:
            err.close()


def wait_until(condition, proc: subprocess.Popen, log: Path | None = None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"training exited with {proc.returncode} before the fault point:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the fault point")
        time.sleep(0.02)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def checkpoint_state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def assert_close(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= TOL, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(run: Path, reference: Path) -> None:
    """model/ weights and metrics.json of two run folders agree within 1e-6."""
    files = sorted(p.relative_to(reference) for p in (reference / "model").glob("*.safetensors"))
    assert files and files == sorted(p.relative_to(run) for p in (run / "model").glob("*.safetensors"))
    for rel in files:
        a, b = load_file(str(run / rel)), load_file(str(reference / rel))
        assert set(a) == set(b)
        for k in a:
            diff = (a[k].double() - b[k].double()).abs().max().item()
            assert diff <= TOL, f"{rel}:{k} differs by {diff}"
    assert_close(json.loads((run / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text()),
                 "metrics.json")
    assert json.loads((run / "resources.json").read_text())["resumed"] is True


def assert_only_safetensors_and_json(run: Path) -> None:
    suffixes = {p.suffix for p in run.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}, suffixes


# ------------------------------------------------------------- subprocess kill / resume tests


@pytest.fixture(scope="module")
def kill_setup(tiny_bert, wnut_small, tmp_path_factory):
    """The recipe factory and an uninterrupted reference run (CLI) of that recipe."""
    base = tmp_path_factory.mktemp("resume")

    def recipe_for(name: str) -> Path:
        return write_recipe(base / f"{name}.yaml", ner_recipe(tiny_bert, wnut_small, base / name, LORA, **KILL_TRAIN))

    ref = recipe_for("reference")
    res = run_cli("train", str(ref))
    assert res.returncode == 0, res.stderr[-3000:]
    reference = base / "reference"
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["steps"] == 18 and len(metrics["history"]) == 3
    assert metrics["best_step"] == 12  # dev loss is lowest after epoch 2: the final model is not the last step's
    assert [s for s, _ in metrics["train_loss"]] == [3, 6, 9, 12, 15, 18]
    assert [p.name for p in list_checkpoints(reference / "checkpoints")] == ["step-000012", "step-000016"]
    assert_only_safetensors_and_json(reference)
    return recipe_for, reference


def test_killed_three_times_then_resumed_gives_identical_results(kill_setup, tmp_path):
    """One run killed (SIGKILL) three times and resumed three times, each with a fresh process:

    1. as soon as polling sees its first checkpoint (no fault injected: wherever it happens to be);
    2. right after the mid-epoch checkpoint step-8;
    3. while writing the checkpoint step-16 (after the epoch-end checkpoint step-12); two more broken
       checkpoints are planted next to it (step-14 truncated, step-15 half-copied without state.json);
    4. the last resume starts from step-12 and finishes: same weights and metrics.json as the reference.
    """
    recipe_for, reference = kill_setup
    recipe = recipe_for("killed")
    run = Path(yaml.safe_load(recipe.read_text())["output"]["dir"])
    ckpt_dir, log, marker = run / "checkpoints", tmp_path / "stderr.log", tmp_path / "marker"

    # 1. a real kill at whatever point the run has reached when the first checkpoint appears
    proc = start_train(recipe, log=log)
    wait_until(lambda: latest_checkpoint(ckpt_dir) is not None, proc, log)
    sigkill(proc)
    first = latest_checkpoint(ckpt_dir)
    assert step_of(first) < 8, f"the run got to {first.name} before it was killed"
    assert not (run / "metrics.json").exists() and not (run / "model").exists()

    # 2. resumed, killed right after the mid-epoch checkpoint step-8 (epoch 2, 2 batches into it)
    proc = start_train(recipe, "--resume", fault="pause_after_checkpoint:8", log=log)
    wait_until(lambda: (ckpt_dir / "step-000008" / "state.json").is_file(), proc, log)
    sigkill(proc)
    mid = checkpoint_state(latest_checkpoint(ckpt_dir))
    assert (mid["step"], mid["epoch"], mid["batches_done"], mid["best_step"]) == (8, 1, 2, 6)
    assert (ckpt_dir / "step-000008" / "best.safetensors").is_file()

    # 3. resumed, killed in the middle of writing step-16 (after the epoch-end checkpoint step-12)
    proc = start_train(recipe, "--resume", fault="pause_in_checkpoint:16", marker=marker, log=log)
    wait_until(marker.exists, proc, log)
    sigkill(proc)
    torn = [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-step-000016.")]
    assert len(torn) == 1 and (torn[0] / "optimizer.safetensors").is_file() and not (torn[0] / "state.json").exists()
    assert not (ckpt_dir / "step-000016").exists()
    end = checkpoint_state(latest_checkpoint(ckpt_dir))
    assert (end["step"], end["epoch"], end["batches_done"], end["best_step"]) == (12, 2, 0, 12)  # epoch end
    truncated = ckpt_dir / "step-000014"
    shutil.copytree(ckpt_dir / "step-000012", truncated)
    data = (truncated / "optimizer.safetensors").read_bytes()
    (truncated / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    half = ckpt_dir / "step-000015"
    half.mkdir()
    shutil.copy(ckpt_dir / "step-000012" / "trainable.safetensors", half)
    assert latest_checkpoint(ckpt_dir) == truncated  # complete-looking, but unreadable

    # 4. resumed from the newest readable checkpoint, to the end
    res = run_cli("train", str(recipe), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    resumes = [ln.split("resume: ", 1)[1] for ln in (run / "train.log").read_text().splitlines() if "resume: from" in ln]
    assert len(resumes) == 3, resumes
    assert resumes[0].startswith(f"from {first.name} (step {step_of(first)}, ")
    assert resumes[1] == "from step-000008 (step 8, epoch 2, 2 batches into it)"
    assert resumes[2].startswith("from step-000012 (step 12, epoch 3, 0 batches into it); skipped unreadable step-000014")
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]  # leftovers cleaned up
    assert_same_run(run, reference)
    assert_only_safetensors_and_json(run)


# ----------------------------------------------- in-process: resume from every checkpoint position


def test_resume_from_every_checkpoint_with_grad_accum_and_mid_epoch_evals(tiny_bert, wnut_small, tmp_path):
    """grad_accum 2 (3 optimizer steps per epoch), plain shuffling, evaluation every 2 steps (the best
    is step 6 of 9): resuming from each checkpoint (mid-epoch and epoch end) reproduces the run.
    The resumed folder holds only that checkpoint, plus a wrong best/ (as if written later by the
    interrupted run): the best model must come from the checkpoint."""
    ref = tmp_path / "ref"
    train = dict(epochs=3, lr=3e-2, metric="loss", grad_accum=2, group_by_length=False, eval_steps=2,
                 checkpoint_every=2, keep_checkpoints=10, log_every=2, num_threads=1)
    recipe = ner_recipe(tiny_bert, wnut_small, ref, LORA, **train)
    metrics = peftlab.train(recipe)
    assert metrics["steps"] == 9 and [h["step"] for h in metrics["history"]] == [2, 4, 6, 8, 9]
    assert metrics["best_step"] == 6
    ckpts = list_checkpoints(ref / "checkpoints")
    assert [step_of(p) for p in ckpts] == [2, 3, 4, 6, 8]
    assert [checkpoint_state(p)["batches_done"] for p in ckpts] == [4, 0, 2, 0, 4]  # 3 and 6: epoch ends
    best = load_file(str(ref / "checkpoints" / "best" / "trainable.safetensors"))

    for ckpt in ckpts:
        run = tmp_path / f"from-{ckpt.name}"
        (run / "checkpoints").mkdir(parents=True)
        for name in ("recipe.yaml", "labels.json"):
            shutil.copy(ref / name, run / name)
        shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
        wrong = run / "checkpoints" / "best"
        wrong.mkdir()
        save_file({k: torch.zeros_like(v) for k, v in best.items()}, str(wrong / "trainable.safetensors"))
        (wrong / "best.json").write_text(json.dumps({"step": 9, "epoch": 3, "loss": 0.0}))
        peftlab.train({**recipe, "output": {"dir": str(run)}}, resume=True)
        assert_same_run(run, ref)


# ------------------------------------------------------------------- refusals (exit 2, one line)


def test_resume_refusals(tiny_bert, wnut_small, tmp_path):
    recipe = ner_recipe(tiny_bert, wnut_small, tmp_path / "empty", LORA, num_threads=1)
    with pytest.raises(PeftlabError, match=r"--resume: no complete checkpoint in .*empty/checkpoints .*run without --resume to start again"):
        peftlab.train(recipe, resume=True)
    with pytest.raises(PeftlabError, match="--resume and --overwrite exclude each other"):
        peftlab.train(recipe, resume=True, overwrite=True)
    assert not (tmp_path / "empty").exists()

    run = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, run, LORA, max_steps=2, checkpoint_every=1, num_threads=1)
    peftlab.train(recipe)
    with pytest.raises(PeftlabError, match=r"--resume: .*/run is a finished run \(metrics.json exists\).*--overwrite"):
        peftlab.train(recipe, resume=True)
    (run / "metrics.json").unlink()  # as if killed just before the end
    changed = {**recipe, "train": {**recipe["train"], "lr": 1e-3}}
    with pytest.raises(PeftlabError, match=r"--resume: train.lr differs from the run's .*recipe.yaml"):
        peftlab.train(changed, resume=True)
    peftlab.train(recipe, resume=True)  # the same recipe resumes (from step 1) and finishes
    assert (run / "metrics.json").is_file()
