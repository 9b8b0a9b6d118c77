"""End-to-end training on a tiny random BERT: run folder, parameter counts, save/load, methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import cls_recipe, ner_recipe, rescore_test
from peftlab.errors import PeftlabError
from peftlab.runs import load_run

RUN_FILES = {"metrics.json", "recipe.yaml", "labels.json", "params.json", "resources.json", "train.log", "model"}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def lora_count(r: int, shapes: list[tuple[int, int]]) -> int:
    return sum(r * (d_in + d_out) for d_in, d_out in shapes)


def bert_linear_shapes(hidden: int, inter: int, layers: int) -> list[tuple[int, int]]:
    per_layer = [(hidden, hidden)] * 4 + [(hidden, inter), (inter, hidden)]  # q k v attn-out, ffn in/out
    return per_layer * layers


@pytest.fixture(scope="module")
def lora_run(tiny_bert, wnut_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4, "alpha": 8}, epochs=3, lr=1e-2)
    metrics = peftlab.train(recipe)
    return out, metrics


def test_run_folder_contents(lora_run):
    out, metrics = lora_run
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    m = read(out / "metrics.json")
    assert m == json.loads(json.dumps(metrics))
    assert m["best_epoch"] in (1, 2, 3) and len(m["history"]) == 3
    assert {"f1", "precision", "recall", "per_type"} <= set(m["test"])
    assert m["dev"]["step"] == m["best_step"]
    res = read(out / "resources.json")
    assert res["peak_rss_bytes"] > 100e6 and res["train_time_s"] > 0 and res["tokens_per_s"] > 0
    assert read(out / "labels.json")[0] == "O"
    recipe_text = (out / "recipe.yaml").read_text()
    assert "r: 4" in recipe_text and "scheduler: linear" in recipe_text  # resolved, defaults filled


def test_loss_falls(lora_run):
    out, metrics = lora_run
    losses = [loss for _, loss in metrics["train_loss"]]
    assert len(losses) >= 2
    assert losses[-1] < losses[0] * 0.7, losses
    dev_losses = [h["loss"] for h in metrics["history"]]
    assert dev_losses[-1] < dev_losses[0]


def test_lora_param_count_is_analytic(lora_run):
    out, _ = lora_run
    p = read(out / "params.json")
    n_labels = len(read(out / "labels.json"))
    head = 32 * n_labels + n_labels
    expected = lora_count(4, bert_linear_shapes(32, 64, 2))
    assert p["trainable_params_without_head"] == expected
    assert p["trainable_head_params"] == head
    assert p["trainable_params"] == expected + head
    assert p["peft_count"]["trainable"] == expected + head


def test_saved_adapter_includes_head_and_reloads_identically(lora_run, wnut_small):
    out, metrics = lora_run
    keys = load_file(str(out / "model" / "adapter_model.safetensors")).keys()
    assert any("classifier" in k for k in keys)
    run = load_run(out)
    tok = run.tokenizer
    batch = tok([["Paris", "is", "in", "France"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        a = run.model(**batch).logits
        b = load_run(out).model(**batch).logits
    assert torch.equal(a, b)


def test_real_test_metric_recomputed_from_saved_model(lora_run):
    """The test F1 in metrics.json is what the saved model scores (the best model was restored)."""
    out, metrics = lora_run
    again = rescore_test(load_run(out))
    assert again["f1"] == pytest.approx(metrics["test"]["f1"], abs=1e-9)
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("method, trainable_check", [
    ({"name": "full"}, lambda p: p["trainable_params"] == p["total_params"]),
    ({"name": "head"}, lambda p: p["trainable_params"] == p["head_params"] == p["trainable_head_params"]),
    ({"name": "head", "unfreeze_last_layers": 1},
     lambda p: p["trainable_params_without_head"] == (4 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 4 * 32) + (32 * 32 + 32)),
])
def test_full_and_head_methods_train_and_reload(tiny_bert, banking_small, tmp_path, method, trainable_check):
    out = tmp_path / "run"
    metrics = peftlab.train(cls_recipe(tiny_bert, banking_small, out, method, epochs=2, lr=2e-3))
    p = read(out / "params.json")
    assert trainable_check(p), p
    assert metrics["test"]["accuracy"] >= 0
    run = load_run(out)
    tok = run.tokenizer
    batch = tok(["my card has not arrived"], return_tensors="pt")
    with torch.no_grad():
        assert run.model(**batch).logits.shape == (1, 6)


def test_fused_adamw_by_default_and_the_loop_on_request(tiny_bert, banking_small, tmp_path):
    """train.fused_optimizer (default true) trains with torch's fused AdamW kernel (as the transformers
    Trainer does); false with the per-tensor loop. Same updates up to float rounding."""
    weights = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        recipe = cls_recipe(tiny_bert, banking_small, out, {"name": "full"}, lr=2e-3, max_steps=3)
        if not fused:
            recipe["train"]["fused_optimizer"] = False
        peftlab.train(recipe)
        log = (out / "train.log").read_text()
        assert ("AdamW (fused)" if fused else "AdamW (per-tensor loop)") in log, log
        assert f"fused_optimizer: {str(fused).lower()}" in (out / "recipe.yaml").read_text()
        weights[fused] = load_file(str(out / "model" / "model.safetensors"))
    start = load_file(str(Path(tiny_bert) / "model.safetensors"))
    moved = [k for k in start if not torch.equal(start[k], weights[True]["bert." + k])]
    assert len(moved) > 10  # the steps changed the encoder
    assert weights[True].keys() == weights[False].keys()
    for key in weights[True]:
        torch.testing.assert_close(weights[True][key], weights[False][key], rtol=1e-4, atol=1e-5, msg=key)


def test_existing_run_dir_is_refused(lora_run, tiny_bert, wnut_small):
    out, _ = lora_run
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4})
    with pytest.raises(PeftlabError, match="already holds files; pass --resume .* or --overwrite"):
        peftlab.train(recipe)


def test_bad_input_writes_nothing(tiny_bert, wnut_small, tmp_path):
    out = tmp_path / "never"
    bad = dict(wnut_small, validation=str(tmp_path / "missing.conll"))
    with pytest.raises(PeftlabError, match="data.validation: file not found"):
        peftlab.train(ner_recipe(tiny_bert, bad, out, {"name": "lora"}))
    assert not out.exists()


# ------------------------------------------------------------------ CPU memory: fixed mmap threshold

_FRAGMENT = r"""
import sys, torch
from peftlab.system import current_rss_bytes, set_mmap_threshold
if sys.argv[1] == "fixed":
    assert set_mmap_threshold(1.0)
big = torch.ones(16 * 2**20 // 4); del big   # freeing a 16 MiB mmapped block raises glibc's adaptive threshold
base = current_rss_bytes()
blocks = [torch.ones(8 * 2**20 // 4) for _ in range(24)]   # 24 x 8 MiB, touched
for i in range(0, 24, 2):
    blocks[i] = None                                        # free every other one: holes, not the heap top
print((current_rss_bytes() - base) / 2**20)
"""


def test_fixed_mmap_threshold_returns_freed_memory(tmp_path):
    """With glibc's adaptive threshold, freed 8 MiB tensors stay resident; with a fixed one they are unmapped."""
    import subprocess
    import sys

    retained = {}
    for mode in ("adaptive", "fixed"):
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True)
        retained[mode] = float(out.stdout.split()[-1])
    assert retained["adaptive"] > 170, retained   # all 24 blocks (192 MiB) still resident
    assert retained["fixed"] < 120, retained      # only the 12 live blocks (96 MiB)


def test_trim_on_the_way_from_small_to_large_batches(monkeypatch):
    """The heap is handed back once before the first large batch after small ones, never between
    equal batches (fixed-length windows), and not on other devices."""
    from peftlab import system

    calls = []
    monkeypatch.setattr(system, "release_free_memory", lambda: calls.append(1) or True)
    trim = system.TrimBeforeLargeBatches(True)
    trims = [trim.before(size) for size in (100, 20, 30, 90, 95, 20, 100, 79)]
    assert trims == [False, False, False, True, False, False, True, False] and len(calls) == 2
    equal = system.TrimBeforeLargeBatches(True)
    assert not any(equal.before(384) for _ in range(5))
    off = system.TrimBeforeLargeBatches(False)
    assert not any(off.before(size) for size in (100, 20, 100)) and len(calls) == 2


_HEAP = r"""
import torch
from peftlab.system import TrimBeforeLargeBatches, current_rss_bytes, set_mmap_threshold
assert set_mmap_threshold(1.0)
trim = TrimBeforeLargeBatches(True)
trim.before(1000)
base = current_rss_bytes()
small = [torch.ones(2**19 // 4) for _ in range(400)]   # a small batch's 400 x 512 KiB tensors: heap, not mmap
keep = small[::8]                                      # a few stay alive, so the heap cannot shrink from its top
del small
held = current_rss_bytes()
assert trim.before(100) is False and trim.before(900) is True
print((held - base) / 2**20, (current_rss_bytes() - base) / 2**20)
"""


def test_trim_returns_the_small_batches_heap():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, check=True)
    held, after = map(float, out.stdout.split()[-2:])
    assert held > 150, (held, after)   # 200 MiB freed, still resident
    assert after < 60, (held, after)   # the 50 live tensors (25 MiB) and little else


def test_cpu_mmap_threshold_option_trains(tiny_bert, wnut_small, tmp_path):
    recipe = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 4}, epochs=1)
    recipe["train"]["cpu_mmap_threshold_mb"] = 1
    metrics = peftlab.train(recipe)
    assert metrics["dev"]["f1"] >= 0.0
    assert "memory: glibc mmap threshold fixed at 1 MiB" in (tmp_path / "run" / "train.log").read_text()
