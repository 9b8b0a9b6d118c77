"""The GPU path on a real CUDA device (``python -m pytest tests/gpu``; benchmarks/gpu_check.sh runs it
on a fresh GPU machine). Without CUDA every test here is skipped with the reason "CUDA not
available"; the main suite does not collect this folder (tests/conftest.py).

Tiny random-config BERT and Llama (tests/conftest.py fixtures), a few optimizer steps each: every
built-in method and a sample of peft tuners, with quantization none/int8/nf4/fp4 where the method
supports it, under fp16 and bf16 mixed precision; resume after SIGKILL; merges from each
quantization verified, then predicted with peftlab and with a transformers pipeline on CUDA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import peftlab
from conftest import ROOT, gen_recipe, ner_recipe

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="CUDA not available")]

METHODS = [{"name": "full"}, {"name": "head"}, {"name": "lora", "r": 4}, {"name": "adapter"},
           {"name": "prefix"}, {"name": "ia3"}, {"name": "loha"}]
QUANTIZATIONS = ["none", "int8", "nf4", "fp4"]
SHIM = Path(__file__).resolve().parents[1] / "fault_shim"


def _cases() -> list:
    from peftlab.methods import get_method_class

    cases = []
    for method in METHODS:
        quantized = get_method_class(method["name"]).supports_quantization
        for q in QUANTIZATIONS if quantized else ["none"]:
            for precision in ("fp16", "bf16"):
                cases.append(pytest.param(method, q, precision, id=f"{method['name']}-{q}-{precision}"))
    return cases


def _bf16_or_skip(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")


def _recipe(tiny_bert, files, out: Path, method: dict, quantization: str, precision: str, **train) -> dict:
    r = ner_recipe(tiny_bert, files, out, method, lr=1e-2, log_every=2, mixed_precision=precision, **train)
    r["backbone"].update(quantization=quantization,
                         compute_dtype="bfloat16" if precision == "bf16" else "float16")
    return r


@pytest.mark.parametrize("method, quantization, precision", _cases())
def test_every_method_trains_on_cuda(tiny_bert, wnut_small, tmp_path, method, quantization, precision):
    _bf16_or_skip(precision)
    metrics = peftlab.train(_recipe(tiny_bert, wnut_small, tmp_path / "run", method, quantization, precision,
                                    epochs=2))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # it learns
    resources = json.loads((tmp_path / "run" / "resources.json").read_text())
    assert resources["cuda_max_memory_allocated_bytes"] > 0  # CUDA peak memory is reported
    assert metrics["steps"] == 2 * 6  # 96 sentences / batch 16, as on CPU


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}], ids=["full", "lora"])
def test_causal_lm_trains_on_cuda(tiny_llama, banking_small, tmp_path, method):
    metrics = peftlab.train(gen_recipe(tiny_llama, banking_small, tmp_path / "run", method, max_steps=6, lr=5e-3,
                                       mixed_precision="bf16" if torch.cuda.is_bf16_supported() else "fp16"))
    assert torch.isfinite(torch.tensor(metrics["test"]["loss"]))


def _launch(recipe: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", str(recipe), *args], cwd=ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_gives_the_same_weights(tiny_bert, wnut_small, tmp_path):
    from safetensors.torch import load_file

    train = dict(epochs=2, checkpoint_every=4, num_threads=1)
    for name in ("ref", "killed"):
        r = _recipe(tiny_bert, wnut_small, tmp_path / name, {"name": "lora", "r": 4}, "none", "no", **train)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
    assert _launch(tmp_path / "ref.yaml").wait(timeout=600) == 0
    marker = tmp_path / "marker"
    proc = _launch(tmp_path / "killed.yaml", env={"PYTHONPATH": str(SHIM), "PEFTLAB_TEST_MARKER": str(marker),
                                                   "PEFTLAB_TEST_FAULT": "pause_after_checkpoint:4"})
    deadline = time.time() + 600
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _launch(tmp_path / "killed.yaml", "--resume").wait(timeout=600) == 0
    a = load_file(str(tmp_path / "ref" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_merge_verifies_and_the_merged_model_predicts_on_cuda(tiny_bert, wnut_small, tmp_path, quantization):
    from transformers import pipeline

    from peftlab.api import merge, predict

    run = tmp_path / "run"
    peftlab.train(_recipe(tiny_bert, wnut_small, run, {"name": "lora", "r": 4}, quantization, "no", epochs=1))
    report = merge(run, tmp_path / "merged", verify_examples=24)
    assert report["passed"]
    rows = predict(tmp_path / "merged", ["Heading to Paris with Emma"])
    assert rows and rows[0]["text"] == "Heading to Paris with Emma"
    ner = pipeline("token-classification", model=str(tmp_path / "merged"), device=0)
    assert isinstance(ner("Heading to Paris with Emma"), list)
    assert next(ner.model.parameters()).device.type == "cuda"
