"""Real 2-process DDP on CPU through `accelerate launch peftlab/run.py` (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import ROOT, free_port, ner_recipe


def launch(recipe_path, extra_env, *args, multi_gpu=True, timeout=600, config_file=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:  # a shipped launch config decides processes and backend
        cmd += ["--config_file", str(config_file)]
    else:
        cmd += (["--multi_gpu"] if multi_gpu else []) + ["--num_processes", "2", "--num_machines", "1",
                                                          "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / "peftlab" / "run.py"), str(recipe_path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_ddp_identical_weights_and_rank0_writes(tiny_bert, wnut_small, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4}, lr=1e-2)))
    audit = tmp_path / "audit"
    res = launch(recipe, {"ACCELERATE_USE_CPU": "1", "PEFTLAB_WRITE_AUDIT": str(audit)}, "train.max_steps=6",
                 config_file=ROOT / "configs" / "accelerate" / "ddp_cpu.yaml")  # the shipped CPU config
    assert res.returncode == 0, res.stderr[-3000:]
    resources = json.loads((out / "resources.json").read_text())
    assert resources["processes"] == 2
    fps = resources["rank_weight_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1]
    assert resources["optimizer_steps"] == 6
    # 96 sentences / (16 per process x 2 processes) = 3 steps per epoch: the batches really were sharded
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["best_epoch"] in (1, 2)
    assert (audit / "writes-rank0.log").read_text().count("\n") >= 5
    assert not (audit / "writes-rank1.log").exists()


def test_every_shipped_launch_config_parses_and_names_its_command():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"ddp_cpu", "ddp_gpus", "ddp_two_nodes", "fsdp2_cpu", "fsdp2_gpus",
                                         "fsdp2_qlora_gpus", "deepspeed_zero2", "deepspeed_zero3_offload"}
    for path in configs:
        cfg = load_config_from_file(str(path))  # accelerate's own reader (unknown keys are errors)
        assert cfg.num_processes >= 2, path
        header = path.read_text().splitlines()[:4]
        assert any(f"accelerate launch --config_file configs/accelerate/{path.name}" in ln for ln in header), path


def test_a_deepspeed_launch_is_stopped_in_one_line(tiny_bert, wnut_small, tmp_path):
    """What accelerate sets for configs/accelerate/deepspeed_*.yaml (on CPU accelerate would quietly
    run plain DDP instead): one line naming the FSDP2 config, nothing written."""
    from conftest import run_cli

    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4})))
    res = run_cli("train", str(recipe), env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("peftlab: error: launch: DeepSpeed is not supported")
    assert "fsdp2_gpus.yaml" in res.stderr and not out.exists()
