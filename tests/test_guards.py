"""Guards: a non-finite loss or non-finite weights stop training (exit 3) with the step number and keep
the last good checkpoint; a multi-process launch that did not form a process group is stopped."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

import peftlab
from conftest import ner_recipe, run_cli
from peftlab.checkpoint import list_checkpoints, load_checkpoint
from peftlab.errors import TrainingError
from test_ddp import launch

SHIM = Path(__file__).resolve().parent / "fault_shim"
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}


def assert_good_checkpoint(folder: Path) -> None:
    ckpt = load_checkpoint(folder)
    assert all(torch.isfinite(t).all() for t in ckpt["trainable"].values())
    assert all(torch.isfinite(t).all() for t in ckpt["optimizer"]["state"][0].values() if torch.is_tensor(t))


def test_inf_loss_stops_with_step_number_exit_3_and_keeps_last_checkpoint(tiny_bert, wnut_small, tmp_path):
    """The 7th batch (step 7, first of epoch 2) returns an infinite loss (injected from outside)."""
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, run, LORA, epochs=2, checkpoint_every=2,
                                                num_threads=1)))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")])),
           "PEFTLAB_TEST_FAULT": "inf_loss_at:7"}
    res = run_cli("train", str(recipe), env=env)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("peftlab: error:")] == lines[-1:]  # one error line, the last one
    assert lines[-1] == (
        f"peftlab: error: train: loss is inf at step 7 (epoch 2); training stopped. "
        f"Last good checkpoint: {run / 'checkpoints' / 'step-000006'}. Lower train.lr or check the data"
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000004", "step-000006"]
    assert_good_checkpoint(run / "checkpoints" / "step-000006")
    assert not (run / "metrics.json").exists() and not (run / "model").exists()
    assert "stopped: train: loss is inf at step 7 (epoch 2)" in (run / "train.log").read_text()
    # the run can be resumed from that checkpoint once the cause is fixed (here: no more injected fault)
    res = run_cli("train", str(recipe), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12


def test_diverging_lr_stops_at_the_first_nan_loss(tiny_bert, wnut_small, tmp_path):
    """A real divergence: lr 1e30 (no warmup) makes the step-1 weights huge; the step-2 loss is nan."""
    run = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, run, LORA, lr=1e30, warmup_steps=0, checkpoint_every=1, num_threads=1)
    with pytest.raises(TrainingError) as info:
        peftlab.train(recipe)
    msg = str(info.value)
    assert msg.startswith("train: loss is nan at step 2 (epoch 1); training stopped. Last good checkpoint: "), msg
    assert msg.endswith(f"{run / 'checkpoints' / 'step-000001'}. Lower train.lr or check the data")
    assert info.value.exit_code == 3
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000001"]
    assert_good_checkpoint(run / "checkpoints" / "step-000001")
    assert not (run / "metrics.json").exists() and not (run / "model").exists()


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tiny_bert, wnut_small, tmp_path, monkeypatch):
    """The optimizer update of step 4 turns a weight into nan (the loss of step 4 was finite): the
    checkpoint of step 4 is refused, step-000002 stays the last one."""
    import peftlab.training.finetune as trainer

    real_make_optimizer = trainer.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        real_step, calls = optimizer.step, []

        def step(*a, **k):
            out = real_step(*a, **k)
            calls.append(1)
            if len(calls) == 4:
                with torch.no_grad():
                    optimizer.param_groups[-1]["params"][0].view(-1)[0] = float("nan")
            return out

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    run = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, run, LORA, checkpoint_every=2, num_threads=1)
    with pytest.raises(TrainingError) as info:
        peftlab.train(recipe)
    assert re.fullmatch(
        r"train: weights became non-finite \(nan/inf in \S+\) at step 4 \(epoch 1\); checkpoint not saved, "
        r"training stopped\. Last good checkpoint: " + re.escape(str(run / "checkpoints" / "step-000002"))
        + r"\. Lower train\.lr or check the data", str(info.value)), str(info.value)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert_good_checkpoint(run / "checkpoints" / "step-000002")
    assert not (run / "metrics.json").exists() and not (run / "model").exists()


def test_full_disk_while_checkpointing_stops_cleanly_and_resumes(tiny_bert, wnut_small, tmp_path, monkeypatch):
    """Writing checkpoint step-4 fails with ENOSPC: exit-3 error naming the folder and the last good
    checkpoint, no partial folder left; once there is space again, --resume finishes the run."""
    import peftlab.checkpoint as checkpoint

    real_save_file = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if ".tmp-step-000004." in str(filename) and str(filename).endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, run, LORA, checkpoint_every=2, num_threads=1)
    with pytest.raises(TrainingError) as info:
        peftlab.train(recipe)
    ckpts = run / "checkpoints"
    assert str(info.value) == (
        f"output.dir: cannot write {ckpts / 'step-000004'} (No space left on device); training stopped at step 4. "
        f"Last good checkpoint: {ckpts / 'step-000002'}; free space (or fix permissions) and continue with --resume"
    )
    assert info.value.exit_code == 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]  # no partial step-000004, no temporary
    assert not (run / "metrics.json").exists()
    assert "stopped: output.dir: cannot write" in (run / "train.log").read_text()

    monkeypatch.undo()  # space again
    metrics = peftlab.train(recipe, resume=True)
    assert metrics["steps"] == 6 and (run / "metrics.json").is_file()


def test_multi_gpu_launch_on_cpu_without_process_group_is_stopped(tiny_bert, wnut_small, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine without
    ACCELERATE_USE_CPU=1 starts 2 processes that do not form a process group: refused, nothing written."""
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, run, LORA, max_steps=2)))
    saved = os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        res = launch(recipe, {"CUDA_VISIBLE_DEVICES": ""}, multi_gpu=True)  # as on a machine without GPUs
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_CPU"] = saved
    assert res.returncode != 0, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("peftlab: error:")]
    assert errors, res.stderr[-3000:]
    for line in errors:  # every rank explains itself
        assert "2 processes were started but they did not form a process group (accelerate sees 1)" in line
        assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in line
    assert not run.exists()
