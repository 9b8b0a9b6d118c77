"""The causal_lm task on a tiny random Llama: templates, encoding, completion-only loss computed at
completion positions only, generation scoring, training with each method, reading a run back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftlab
from conftest import gen_recipe
from peftlab.errors import PeftlabError
from peftlab.recipe import recipe_from_dict
from peftlab.tasks import get_task_class
from peftlab.tasks.causal_lm import (
    CausalLMCollator,
    completion_logits,
    exact_match,
    normalize_answer,
    template_fields,
    token_f1,
)


def make_task(tiny_llama, files, tmp_path, **data):
    r = gen_recipe(tiny_llama, files, tmp_path / "run", {"name": "lora", "r": 4})
    r["data"].update(data)
    recipe = recipe_from_dict(r)
    return get_task_class("causal_lm")(recipe)


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def model_of(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


EXAMPLES = [
    {"text": "Where is my card?", "category": "card_arrival", "_where": "a.csv:2"},
    {"text": "How old do I need to be to open an account here?", "category": "age_limit", "_where": "a.csv:3"},
    {"text": "pin blocked", "category": "pin_blocked", "_where": "a.csv:4"},
]


# ----------------------------------------------------------------------------------- templates


def test_template_fields_and_formats():
    assert template_fields("Query: {text}\nIntent:", "prompt_template") == ["text"]
    assert template_fields(" {category:words,upper} / {text} {category}", "completion_template") == ["category", "text"]
    with pytest.raises(PeftlabError, match=r"data.completion_template: unknown format 'wrds'"):
        template_fields(" {category:wrds}", "completion_template")
    with pytest.raises(PeftlabError, match=r"data.prompt_template: .*positional field"):
        template_fields("Query: {}", "prompt_template")


def test_normalisation_and_scores():
    assert normalize_answer("  Card_Arrival. ") == "card arrival"
    assert exact_match("card arrival", "card_arrival") == 1.0
    assert exact_match("card arrival soon", "card_arrival") == 0.0
    assert token_f1("card arrival soon", "card arrival") == pytest.approx(0.8)
    assert token_f1("", "card arrival") == 0.0 and token_f1("", "") == 1.0


def test_unknown_column_names_file_and_key(tiny_llama, banking_small, tmp_path):
    task = make_task(tiny_llama, banking_small, tmp_path, prompt_template="Q: {question}")
    with pytest.raises(PeftlabError, match=r"no column 'question' in the header .*; "
                                           r"the recipe names it in data.prompt_template$"):
        task.load_splits()
    task = make_task(tiny_llama, banking_small, tmp_path, prompt_template="no fields")
    with pytest.raises(PeftlabError, match=r"data.prompt_template: .* reads no column"):
        task.load_splits()


# ------------------------------------------------------------------------------------ encoding


def test_encode_chat_template_and_completion_only_labels(tiny_llama, banking_small, tmp_path):
    tok = tokenizer_of(tiny_llama)
    task = make_task(tiny_llama, banking_small, tmp_path)
    enc = task.encode(EXAMPLES, tok, "validation")
    f = enc.features[0]
    n_prompt = f["prompt_len"]
    prompt = tok.decode(f["input_ids"][:n_prompt])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "Query: Where is my card?\nIntent:<|im_end|>" in prompt
    assert f["labels"][:n_prompt] == [-100] * n_prompt
    completion = f["labels"][n_prompt:]
    assert completion[-1] == tok.eos_token_id
    assert tok.decode(completion[:-1]) == "card arrival"  # chat: the leading space is dropped
    assert enc.extra["references"][1] == "age limit"
    assert len(f["input_ids"]) == len(f["labels"]) == len(f["attention_mask"])
    assert "prompt_len" not in task.encode(EXAMPLES, tok, "train").features[0]


def test_encode_without_chat_template(tiny_llama, banking_small, tmp_path):
    tok = tokenizer_of(tiny_llama)
    task = make_task(tiny_llama, banking_small, tmp_path, use_chat_template=False)
    f = task.encode(EXAMPLES, tok, "test").features[2]
    assert tok.decode(f["input_ids"][: f["prompt_len"]]) == "Query: pin blocked\nIntent:"
    assert tok.decode(f["labels"][f["prompt_len"]:-1]) == " pin blocked"


def test_truncation_keeps_completion_and_prompt_end(tiny_llama, banking_small, tmp_path):
    tok = tokenizer_of(tiny_llama)
    task = make_task(tiny_llama, banking_small, tmp_path, max_length=16, use_chat_template=False)
    f = task.encode(EXAMPLES, tok, "test").features[1]  # 28 prompt + 7 completion tokens
    assert len(f["input_ids"]) == 16 and f["prompt_len"] == 9
    assert tok.decode(f["input_ids"][: f["prompt_len"]]).endswith("here?\nIntent:")
    assert tok.decode(f["labels"][f["prompt_len"]:]) == " age limit<|im_end|>"
    # a completion longer than half of max_length is cut to that half
    f = make_task(tiny_llama, banking_small, tmp_path, max_length=12, use_chat_template=False).encode(
        EXAMPLES, tok, "test").features[1]
    assert len(f["input_ids"]) == 12 and f["prompt_len"] == 6


def test_collator_right_pads_inputs_left_pads_prompts(tiny_llama, banking_small, tmp_path):
    tok = tokenizer_of(tiny_llama)
    task = make_task(tiny_llama, banking_small, tmp_path)
    enc = task.encode(EXAMPLES, tok, "validation")
    batch = CausalLMCollator(tok.pad_token_id)(enc.features)
    lens = [len(f["input_ids"]) for f in enc.features]
    assert batch["input_ids"].shape == (3, max(lens))
    for i, f in enumerate(enc.features):
        assert batch["attention_mask"][i].tolist() == [1] * lens[i] + [0] * (max(lens) - lens[i])
        p = f["prompt_len"]
        row = batch["_prompt_ids"][i]
        assert row[row.shape[0] - p:].tolist() == f["input_ids"][:p]
        assert batch["_prompt_mask"][i].sum() == p and batch["_prompt_mask"][i, -1] == 1


# --------------------------------------------------------------------------------------- loss


def _batch(tiny_llama, banking_small, tmp_path):
    tok = tokenizer_of(tiny_llama)
    task = make_task(tiny_llama, banking_small, tmp_path)
    enc = task.encode(EXAMPLES, tok, "train")
    return task, CausalLMCollator(tok.pad_token_id)(enc.features)


def test_loss_equals_full_logits_loss_and_head_sees_completion_positions_only(tiny_llama, banking_small, tmp_path):
    task, batch = _batch(tiny_llama, banking_small, tmp_path)
    model = model_of(tiny_llama)
    model.eval()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    loss = task.training_loss(model, batch)
    hook.remove()
    n_completion = int((batch["labels"] != -100).sum())  # completion tokens incl. EOS
    assert seen == [(n_completion, 32)]  # hidden size 32; never batch x sequence
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(loss, reference, atol=1e-5)


def test_loss_through_lora_and_gradients(tiny_llama, banking_small, tmp_path):
    from peft import LoraConfig, get_peft_model

    task, batch = _batch(tiny_llama, banking_small, tmp_path)
    model = get_peft_model(model_of(tiny_llama), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero update, so the adapters change the loss
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    loss = task.training_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(loss, reference, atol=1e-5)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_loss_with_gradient_checkpointing_matches(tiny_llama, banking_small, tmp_path):
    task, batch = _batch(tiny_llama, banking_small, tmp_path)
    model = model_of(tiny_llama)
    model.config.attention_dropout = 0.0
    model.train()
    plain = task.training_loss(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = task.training_loss(model, batch)
    ckpt.backward()
    assert torch.allclose(plain, ckpt, atol=1e-6)
    assert model.model.embed_tokens.weight.grad is not None


def test_completion_logits_rows_and_targets(tiny_llama, banking_small, tmp_path):
    task, batch = _batch(tiny_llama, banking_small, tmp_path)
    logits, targets, rows = completion_logits(model_of(tiny_llama), batch)
    assert logits.shape == (targets.shape[0], 512)
    per_row = torch.bincount(rows, minlength=3).tolist()
    assert per_row == [int((batch["labels"][i] != -100).sum()) for i in range(3)]


# -------------------------------------------------------------------------------------- training


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def lora_gen_run(tiny_llama, banking_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "lora"
    recipe = gen_recipe(tiny_llama, banking_small, out, {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                        lr=1e-2, epochs=3, batch_size=16, log_every=1)
    return out, peftlab.train(recipe)


def test_lora_run_learns_and_writes_generation_metrics(lora_gen_run):
    out, metrics = lora_gen_run
    assert metrics["task"] == "causal_lm" and metrics["metric"] == "exact_match"
    losses = [l for _, l in metrics["train_loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # loss falls
    test = metrics["test"]
    assert {"exact_match", "token_f1", "loss", "perplexity", "samples"} <= set(test)
    assert 0.0 <= test["exact_match"] <= test["token_f1"] + 1e-9 <= 1.0 + 1e-9
    assert test["perplexity"] == pytest.approx(float(torch.tensor(test["loss"]).exp()), rel=1e-6)
    assert test["examples"] == 60 and len(test["samples"]) == 8
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert read(out / "params.json")["peft_count"]["trainable"] == read(out / "params.json")["trainable_params"]


def assert_reload_scores_the_same(out: Path, metrics: dict) -> Any:
    """load_run rebuilds the best model: the same teacher-forced test loss, and generate() works.

    (Generated text is compared only where the model is confident: a random tiny model's logits are
    near-ties that batch composition alone can flip.)"""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from peftlab.runs import load_run

    run = load_run(out)
    task, tok = run.task, run.tokenizer
    enc = task.encode(task.load_splits().test, tok, "test").sorted_by_length()
    again = task.evaluate(run.model, DataLoader(enc, batch_size=32, collate_fn=task.collator(tok)), Accelerator(), enc)
    assert again["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)
    assert again["completion_tokens"] == metrics["test"]["completion_tokens"]
    preds = task.generate(run.model, tok, [s["prompt"] for s in metrics["test"]["samples"]], templated=False)
    assert len(preds) == 8 and all(isinstance(p, str) for p in preds)
    return run


def test_load_run_scores_what_training_scored(lora_gen_run):
    out, metrics = lora_gen_run
    assert_reload_scores_the_same(out, metrics)


def _constant_files(tmp_path, banking_small):
    """BANKING77 texts whose completion is always 'yes': a model that learns it scores 1.0."""
    import csv

    files = {}
    for key in ("train", "test"):
        with open(banking_small[key], newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        path = tmp_path / f"{key}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows({"text": r["text"], "category": "yes"} for r in rows)
        files[key] = str(path)
    return files


# LoRA also adapts lm_head here: the tiny random model's embeddings (std 0.02, tied) cap its logits
# near uniform, which adapters on the blocks alone cannot change in a few steps.
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


# To generate "yes" + end-of-sequence the model must tell the position after "y" from the one before it;
# with frozen std-0.02 input embeddings LoRA gets there on some trajectories only (lr 3e-2, seeds 1-3 x
# fused/loop AdamW: exact match 1.0 on 3 of 6, the others stuck on "yyyyyy" at loss ~0.46). With LoRA on
# the input embeddings too and lr 1e-2 it converged on all 6, dev exact match 1.0 from epoch 3 and
# loss <= 2e-4 at epoch 10 (measured here), so the test does not rest on one lucky trajectory.
@pytest.mark.parametrize("method,lr", [
    ({"name": "full"}, 3e-2),
    ({"name": "lora", "r": 8, "alpha": 32, "dropout": 0.0, "target_modules": [*LORA_ALL, "embed_tokens"]}, 1e-2),
], ids=["full", "lora"])
def test_learned_completion_is_generated_exactly(method, lr, tiny_llama, banking_small, tmp_path):
    files = _constant_files(tmp_path, banking_small)
    recipe = gen_recipe(tiny_llama, files, tmp_path / "run", method, lr=lr, epochs=10, batch_size=16,
                        gradient_checkpointing=method["name"] == "full")
    metrics = peftlab.train(recipe)
    assert metrics["test"]["exact_match"] == 1.0, metrics["test"]["samples"][:3]
    assert metrics["test"]["token_f1"] == 1.0
    assert all(s["prediction"] == "yes" for s in metrics["test"]["samples"])
    run = assert_reload_scores_the_same(tmp_path / "run", metrics)
    # prediction from the reloaded run: a bare string fills the template's single field, a dict its columns
    assert run.task.generate(run.model, run.tokenizer, ["Where is my card?", {"text": "I lost my PIN"}]) == ["yes", "yes"]


def test_metric_selection(tiny_llama, banking_small, tmp_path):
    recipe = recipe_from_dict(gen_recipe(tiny_llama, banking_small, tmp_path / "r", {"name": "lora"}, metric="token_f1"))
    task = get_task_class("causal_lm")(recipe)
    assert task.check_metric(recipe.train.metric) == "token_f1" and task.metric_mode("perplexity") == "min"
    with pytest.raises(PeftlabError, match="train.metric: 'accuracy' is not a metric of task causal_lm"):
        task.check_metric("accuracy")


# ------------------------------------------------------------------ prefix, QLoRA, int8 (tiny model)


def _built(tiny_llama, banking_small, tmp_path, method, quantization="none"):
    from peftlab.backbones import load_tokenizer
    from peftlab.runs import build_model

    r = gen_recipe(tiny_llama, banking_small, tmp_path / "b", method)
    r["backbone"]["quantization"] = quantization
    recipe = recipe_from_dict(r)
    task = get_task_class("causal_lm")(recipe)
    tok = load_tokenizer(recipe.backbone)
    device = torch.device("cpu") if quantization != "none" else None
    torch.manual_seed(0)  # the method's random init does not depend on the tests that ran before
    return task, tok, build_model(recipe, task, tok, device=device).model


@pytest.mark.parametrize("method,quantization", [({"name": "prefix", "num_virtual_tokens": 4, "init_std": 0.5}, "none"),
                                                 ({"name": "lora", "r": 4}, "nf4")])
def test_loss_through_prefix_and_qlora_matches_full_logits(method, quantization, tiny_llama, banking_small, tmp_path):
    task, tok, model = _built(tiny_llama, banking_small, tmp_path, method, quantization)
    batch = task.collator(tok)(task.encode(EXAMPLES, tok, "train").features)
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        loss = task.training_loss(model, batch)
        reference = model(**inputs, labels=batch["labels"])
    assert torch.allclose(loss, reference.loss, atol=1e-5)
    if method["name"] == "prefix":  # the prefix really takes part in the forward pass
        from peftlab.methods.prefix import prefix_disabled

        # The tiny random model's tied std-0.02 embeddings keep every loss near ln(vocab) whatever the
        # hidden states (the prefix moved it by 2e-4 to 3e-3, depending on its random init), so the check
        # is on the logits, which it moves by orders of magnitude more than float noise.
        with torch.no_grad(), prefix_disabled(model):
            bare = model(**inputs).logits
            bare_loss = task.training_loss(model, batch)
        assert reference.logits.shape == bare.shape and (reference.logits - bare).abs().max() > 1e-2
        assert bare_loss != loss


@pytest.mark.parametrize("method,quantization", [({"name": "prefix", "num_virtual_tokens": 4}, "none"),
                                                 ({"name": "lora", "r": 4}, "nf4")])
def test_prefix_and_qlora_train_and_reload(method, quantization, tiny_llama, banking_small, tmp_path):
    out = tmp_path / "run"
    files = _constant_files(tmp_path, banking_small)  # the same target every batch: a clean loss trend
    r = gen_recipe(tiny_llama, files, out, method, lr=3e-2, max_steps=6, log_every=1)
    r["backbone"]["quantization"] = quantization
    metrics = peftlab.train(r)
    losses = [l for _, l in metrics["train_loss"]]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    params = read(out / "params.json")
    if quantization != "none":
        assert params["trainable_params"] == params["peft_count"]["trainable"]
    assert_reload_scores_the_same(out, metrics)


def test_untrained_generation_script(tiny_llama, banking_small, tmp_path):
    import importlib.util

    import yaml

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("untrained", ROOT / "benchmarks" / "baselines" / "untrained_generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(gen_recipe(tiny_llama, banking_small, tmp_path / "run", {"name": "lora"})))
    assert mod.main([str(recipe), "data.max_new_tokens=3", "--out", str(tmp_path / "u.json")]) == 0
    m = read(tmp_path / "u.json")
    assert m["examples"] == 60 and 0 <= m["exact_match"] <= 1 and m["loss"] > 0 and len(m["samples"]) == 8


def test_two_process_ddp_generation_run(tiny_llama, banking_small, tmp_path):
    """The completion-only loss through DDP (gradient sync) and the sharded generation gathered back
    in order: both ranks end with the same weights and every test example is scored once."""
    import yaml

    from test_ddp import launch

    out = tmp_path / "run"
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(gen_recipe(tiny_llama, banking_small, out, {"name": "lora", "r": 4},
                                                lr=1e-2, batch_size=8, eval_batch_size=16, num_threads=1)))
    res = launch(recipe, {"ACCELERATE_USE_CPU": "1"}, "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    resources = read(out / "resources.json")
    assert resources["processes"] == 2
    fps = resources["rank_weight_fingerprints"]
    assert fps[0] == fps[1]
    metrics = read(out / "metrics.json")
    assert metrics["test"]["examples"] == 60 and metrics["dev"]["examples"] == 24
    # 60 test rows over 2 ranks x 16 per batch: the last batch is padded by duplicates, which the
    # gathered loss must not count: completion tokens == those of the 60 rows, counted here
    task = get_task_class("causal_lm")(recipe_from_dict(yaml.safe_load(recipe.read_text())))
    enc = task.encode(task.load_splits().test, tokenizer_of(tiny_llama), "test")
    assert metrics["test"]["completion_tokens"] == sum(sum(1 for x in f["labels"] if x != -100) for f in enc.features)


# tied input/output embeddings: LoRA on the output layer, on both, or on the input embeddings only; or
# the input embeddings trained in full (modules_to_save: peft's merge_and_unload unties those itself)
@pytest.mark.parametrize("targets,saved", [(LORA_ALL, []), ([*LORA_ALL, "embed_tokens"], []),
                                           (["q_proj", "v_proj", "embed_tokens"], []),
                                           (["q_proj", "v_proj"], ["embed_tokens"])],
                         ids=["lm_head", "lm_head+embed_tokens", "embed_tokens", "saved-embed_tokens"])
def test_predict_and_merge_a_generation_run(targets, saved, tiny_llama, banking_small, tmp_path):
    """`peftlab predict` on a generation run (prompt in, completion out) gives what the run's own model
    generates; its verified merge is a plain causal LM checkpoint with the trained update folded into
    the weights, and predicts the same, whichever of the tied input/output embeddings LoRA adapted
    or trained in full.
    (Whether the completion is the learned one is the test above.)"""
    from safetensors.torch import load_file

    from peftlab.api import merge, predict
    from peftlab.runs import load_run

    files = _constant_files(tmp_path, banking_small)
    method = {"name": "lora", "r": 8, "alpha": 32, "dropout": 0.0, "target_modules": targets, "modules_to_save": saved}
    peftlab.train(gen_recipe(tiny_llama, files, tmp_path / "run", method, lr=3e-2, epochs=4, batch_size=16))
    texts = ["Where is my card?", "I lost my PIN"]
    rows = predict(tmp_path / "run", texts)
    run = load_run(tmp_path / "run")
    completions = run.task.generate(run.model, run.tokenizer, texts)
    assert [r["completion"] for r in rows] == completions and [r["text"] for r in rows] == texts
    report = merge(tmp_path / "run", tmp_path / "merged", verify_examples=8)
    assert report["passed"] and report["kind"] == "exact" and report["agreement"] == 1.0
    merged, base = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(tiny_llama / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].shape == base[key].shape and not torch.allclose(merged[key], base[key])
    assert not any("lora" in k for k in merged)
    # the tied weight is untied in the merge: each path carries its own update (or none), as in training
    emb = base["model.embed_tokens.weight"]
    assert torch.equal(merged["model.embed_tokens.weight"], emb) == ("embed_tokens" not in targets + saved)
    assert torch.equal(merged["lm_head.weight"], emb) == ("lm_head" not in targets)
    # the merged folder is a plain causal LM checkpoint; the run's prompt template travels with it
    assert [r["completion"] for r in predict(tmp_path / "merged", texts)] == completions
