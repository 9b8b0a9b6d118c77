"""FSDP2 through accelerate on 2 CPU processes (gloo), launched with the shipped
configs/accelerate/fsdp2_cpu.yaml: the same training as one process with the same global batch,
a SIGKILL + --resume that ends where the uninterrupted run ends, and a run folder that merges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, free_port, gen_recipe, ner_recipe, read_sentences, run_cli
from test_ddp import launch
from test_resume import SHIM, assert_same_run, wait_until

FSDP_CPU = ROOT / "configs" / "accelerate" / "fsdp2_cpu.yaml"
# dropout off: one process with batch 8 and two with 4 each then see the same network
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
TRAIN = dict(lr=1e-2, batch_size=4, group_by_length=False, num_threads=1, max_steps=6, eval_steps=3,
             checkpoint_every=2, keep_checkpoints=10, metric="loss")


def write(tmp_path, name, backbone, files, method, **train):
    recipe = ner_recipe(backbone, files, tmp_path / name, method, **{**TRAIN, **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / name


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_bert_no_dropout, wnut_small):
    """``get(method)``: the 2-process FSDP2 run of the method (trained once per module)."""
    root, done = tmp_path_factory.mktemp("fsdp-runs"), {}

    def get(method):
        if method["name"] not in done:
            path, run = write(root, method["name"], tiny_bert_no_dropout, wnut_small, method)
            fsdp(path)
            done[method["name"]] = run
        return done[method["name"]]
    return get


def fsdp(recipe_path, *args, env=None):
    res = launch(recipe_path, {"ACCELERATE_USE_CPU": "1", **(env or {})}, *args, config_file=FSDP_CPU)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def processes_running(recipe_path) -> list[int]:
    """PIDs whose command line names ``recipe_path`` (the launched ranks)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and str(recipe_path) in cmdline and "run.py" in cmdline:
            pids.append(int(entry))
    return pids


def model_weights(run):
    out = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_training(sharded, single, tol):
    a, b = model_weights(sharded), model_weights(single)
    assert set(a) == set(b) and len(a) > 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (sharded, single))
    assert ma["best_step"] == mb["best_step"]
    for split in ("dev", "test"):  # each example's loss counted once, however the processes split the batches
        for key, tol in (("loss", 1e-5), ("f1", 1e-9), ("accuracy", 1e-9)):
            assert abs(ma[split][key] - mb[split][key]) <= tol, (split, key, ma[split][key], mb[split][key])


@pytest.mark.parametrize("method", [LORA, {"name": "full"}, {"name": "adapter", "reduction_factor": 4}], ids=["lora", "full", "adapter"])
def test_fsdp2_two_processes_train_what_one_process_trains(tmp_path, tiny_bert_no_dropout, wnut_small, method, fsdp_runs):
    sharded = fsdp_runs(method)
    log = (sharded / "train.log").read_text()
    assert "2 process(es) on cpu" in log and "FSDP2" in log
    resources = json.loads((sharded / "resources.json").read_text())
    assert resources["processes"] == 2 and resources["optimizer_steps"] == 6
    assert len(resources["rank_weight_fingerprints"]) == 1  # the gathered weights (each process holds half)

    single_recipe, single = write(tmp_path, "single", tiny_bert_no_dropout, wnut_small, method, batch_size=8)
    res = run_cli("train", str(single_recipe), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_training(sharded, single, tol=2e-5)

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(read_sentences(wnut_small["validation"], 12)) + "\n")
    predictions = [run_cli("predict", str(run), "--input", str(texts), timeout=300) for run in (sharded, single)]
    assert all(r.returncode == 0 for r in predictions), predictions[0].stderr[-3000:]
    assert predictions[0].stdout == predictions[1].stdout and predictions[0].stdout.count("\n") == 12
    if method["name"] == "adapter":  # bottleneck adapters are exported, not merged
        return
    merged = tmp_path / "merged"
    res = run_cli("merge", str(sharded), "--out", str(merged), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    verify = json.loads((merged / "verify.json").read_text())
    assert verify["passed"] is True and verify["method"] == method["name"]
    dev = json.loads((sharded / "metrics.json").read_text())["dev"]["f1"]
    assert verify["metrics"]["merged"]["f1"] == pytest.approx(dev, abs=1e-6)  # the merged model is the run's best


def test_fsdp2_sigkill_then_resume_ends_like_the_uninterrupted_run(tmp_path, tiny_bert_no_dropout, wnut_small, fsdp_runs):
    ref = fsdp_runs(LORA)  # the same recipe, uninterrupted

    run_recipe, run = write(tmp_path, "run", tiny_bert_no_dropout, wnut_small, LORA)
    marker, log = tmp_path / "paused", tmp_path / "killed.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(ACCELERATE_USE_CPU="1", PEFTLAB_TEST_FAULT="pause_after_checkpoint:4", PEFTLAB_TEST_MARKER=str(marker),
               PYTHONPATH=os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), "--main_process_port",
           str(free_port()), str(ROOT / "peftlab" / "run.py"), str(run_recipe)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_until(marker.exists, proc, log)
    finally:  # both ranks at once (torch's launcher starts each in its own session), then the launcher
        for pid in processes_running(run_recipe):
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (run / "metrics.json").exists() and not processes_running(run_recipe)

    fsdp(run_recipe, "--resume")
    assert "resume: from step-000004" in (run / "train.log").read_text()
    assert_same_run(run, ref)


def test_fsdp2_generation_task_evaluates_in_step_with_one_process(tmp_path, tiny_llama, banking_small):
    """Generation under FSDP: every forward gathers weights from both processes, so a process whose
    rows finished keeps stepping until the other's do (transformers' synced_gpus); no hang, same scores."""
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    train = dict(lr=1e-2, batch_size=4, num_threads=1, max_steps=2, group_by_length=False)
    runs = {}
    for name, batch in (("fsdp", 4), ("single", 8)):
        recipe = gen_recipe(tiny_llama, banking_small, tmp_path / name, lora, **{**train, "batch_size": batch})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        runs[name] = tmp_path / name
    fsdp(tmp_path / "fsdp.yaml")
    res = run_cli("train", str(tmp_path / "single.yaml"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("fsdp", "single"))
    assert a["test"]["samples"] == b["test"]["samples"] and a["test"]["samples"]  # the same generated answers
    for key in ("exact_match", "token_f1", "loss"):
        assert a["test"][key] == pytest.approx(b["test"][key], abs=1e-3), key
