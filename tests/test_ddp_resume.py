"""Resuming a real 2-process DDP run (CPU, gloo) from a mid-epoch checkpoint reproduces it exactly;
resuming with a different number of processes is refused."""

from __future__ import annotations

import shutil

import pytest
import yaml

import peftlab
from conftest import ner_recipe
from peftlab.checkpoint import list_checkpoints
from peftlab.errors import PeftlabError
from test_ddp import launch
from test_resume import LORA, assert_same_run, checkpoint_state


def copy_checkpoint(ref, run, name):
    (run / "checkpoints").mkdir(parents=True)
    for f in ("recipe.yaml", "labels.json"):
        shutil.copy(ref / f, run / f)
    shutil.copytree(ref / "checkpoints" / name, run / "checkpoints" / name)


def test_two_process_resume_is_identical_and_needs_the_same_process_count(tiny_bert, wnut_small, tmp_path):
    ref = tmp_path / "ref"
    # 96 sentences / (8 per process x 2) = 6 steps per epoch; checkpoints at 2, 4, 6 (epoch end), 8, 10
    train = dict(epochs=2, lr=1e-2, metric="loss", batch_size=8, checkpoint_every=2, keep_checkpoints=10,
                 log_every=3, num_threads=1)
    recipe = ner_recipe(tiny_bert, wnut_small, ref, LORA, **train)
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(recipe))
    res = launch(tmp_path / "ref.yaml", {"ACCELERATE_USE_CPU": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    step4 = ref / "checkpoints" / "step-000004"
    assert [p.name for p in list_checkpoints(ref / "checkpoints")][:2] == ["step-000002", "step-000004"]
    state = checkpoint_state(step4)
    assert (state["batches_done"], state["processes"]) == (4, 2)
    assert len(state["loss_pending"]) == 2  # each rank's running loss (1 batch since the step-3 log)

    run = tmp_path / "run"
    copy_checkpoint(ref, run, "step-000004")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**recipe, "output": {"dir": str(run)}}))
    audit = tmp_path / "audit"
    res = launch(tmp_path / "run.yaml", {"ACCELERATE_USE_CPU": "1", "PEFTLAB_WRITE_AUDIT": str(audit)}, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: from step-000004 (step 4, epoch 1, 4 batches into it)" in (run / "train.log").read_text()
    assert_same_run(run, ref)
    assert (audit / "writes-rank0.log").is_file() and not (audit / "writes-rank1.log").exists()

    single = tmp_path / "single"
    copy_checkpoint(ref, single, "step-000004")
    with pytest.raises(PeftlabError, match=r"--resume: .*step-000004 was written by 2 process\(es\), this launch has 1; "
                                           r".*resume with --num_processes 2"):
        peftlab.train({**recipe, "output": {"dir": str(single)}}, resume=True)
