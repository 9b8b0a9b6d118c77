"""peft passthrough tuners (methods/peft_tuner.py): option validation, every registered tuner on the tiny
BERT (trains, head trained and saved, save -> load identical, merge where claimed, quantization where
claimed), IA3 end to end through the trainer, DoRA through lora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftlab
from conftest import cls_recipe, ner_recipe, run_cli
from peftlab.errors import PeftlabError
from peftlab.methods import available_methods, get_method_class
from peftlab.methods.peft_tuner import TUNERS, UNAVAILABLE, PeftTuner
from peftlab.recipe import recipe_from_dict
from peftlab.runs import build_model, is_head_parameter, load_run
from peftlab.tasks import get_task_class

# The tiny BERT has hidden 32 / intermediate 64: a few tuners' defaults assume bigger layers.
TINY_OPTIONS = {
    "vblora": {"vector_length": 16, "num_vectors": 64},
    "c3a": {"block_size": 16},
    "road": {"group_size": 16},
    "shira": {"r": 4},
    "miss": {"r": 8},
    "waveft": {"n_frequency": 64},
    "ln_tuning": {"target_modules": ["LayerNorm"]},
}
NER_LABELS = ["O", "B-person", "I-person", "B-location", "I-location"]
CLS_LABELS = ["card_arrival", "exchange_rate", "age_limit"]


# ------------------------------------------------------------------------------------ validation

def recipe(tiny_bert, files, method: dict, quantization: str = "none"):
    r = ner_recipe(tiny_bert, files, Path("/nonexistent/out"), method)
    r["backbone"]["quantization"] = quantization
    return r


def error_of(data: dict) -> str:
    with pytest.raises(PeftlabError) as info:
        recipe_from_dict(data, source="r.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("method, expected", [
    ({"name": "loha", "rr": 4},
     "r.yaml: method.rr: unknown key (did you mean 'method.r'?); valid keys here: rank_pattern, alpha_pattern, r, "),
    ({"name": "ia3", "target_module": ["key"]},
     "r.yaml: method.target_module: unknown key (did you mean 'method.target_modules'?); valid keys here: "
     "target_modules, exclude_modules, feedforward_modules, fan_in_fan_out, modules_to_save, init_ia3_weights"),
    ({"name": "vera", "projection_prng": 3},
     "r.yaml: method.projection_prng: unknown key (did you mean 'method.projection_prng_key'?)"),
    ({"name": "loha", "r": "abc"},
     "r.yaml: method.r: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    ({"name": "lokr", "rank_dropout": "high"}, "r.yaml: method.rank_dropout: Input should be a valid number"),
    ({"name": "ia3", "target_modules": ["key"], "feedforward_modules": ["output.dense"]},
     "r.yaml: method.feedforward_modules: peft's IA3Config rejects it: `feedforward_modules` should be a subset "
     "of `target_modules`"),
    ({"name": "oft", "r": 4, "oft_block_size": 8},
     "r.yaml: method.r: peft's OFTConfig rejects it: You can only specify either r (4) or oft_block_size (8)"),
    ({"name": "boft", "boft_block_size": 0, "boft_block_num": 0},
     "r.yaml: method.boft_block_size: peft's BOFTConfig rejects it: Either `boft_block_size` or `boft_block_num` "
     "must be non-zero"),
    ({"name": "ia3", "task_type": "SEQ_CLS"}, "r.yaml: method.task_type: unknown key; valid keys here: "),
    ({"name": "prompt_tuning"}, "r.yaml: method.name: method 'prompt_tuning' is not available: peft's prompt "
     "learning prepends virtual tokens, which breaks token classification"),
    ({"name": "dora"}, "r.yaml: method.name: method 'dora' is not available: DoRA is `method: {name: lora, use_dora: true}`"),
    ({"name": "iaa3"}, "r.yaml: method.name: unknown method 'iaa3' (did you mean 'ia3'?)"),
])
def test_option_errors_name_the_key(tiny_bert, wnut_small, method, expected):
    assert error_of(recipe(tiny_bert, wnut_small, method)).startswith(expected)


def test_unquantizable_tuner_refused_at_load(tiny_bert, wnut_small):
    msg = error_of(recipe(tiny_bert, wnut_small, {"name": "loha"}, quantization="nf4"))
    assert msg.startswith("r.yaml: method.name: method 'loha' cannot train a quantized backbone "
                          "(backbone.quantization: nf4); methods that can: ")
    able = msg.split("methods that can: ")[1].split(" (or set")[0].split(", ")
    assert {"lora", "ia3", "vera", "oft"} <= set(able) and "loha" not in able
    assert msg.endswith("(or set backbone.quantization: none)")


def test_validate_cli_reports_option_error_with_line(tiny_bert, wnut_small, tmp_path):
    import yaml

    data = recipe(tiny_bert, wnut_small, {"name": "vera", "r": 16, "d_initial": 0.1, "vera_dropuot": 0.1})
    path = tmp_path / "vera.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.strip().startswith("vera_dropuot"))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"peftlab: error: {path}:{line}: method.vera_dropuot: unknown key (did you mean 'method.vera_dropout'?); "
        f"valid keys here: {', '.join(get_method_class('vera').Options.model_fields)}"
    ]
    data["method"] = {"name": "vera", "r": 16, "vera_dropout": 0.1}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ok = run_cli("validate", str(path), "--print")
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout.split("ok: ")[0])
    assert resolved["method"]["r"] == 16 and resolved["method"]["projection_prng_key"] == 0  # peft's defaults filled


def test_registry_lists_every_tuner():
    methods = available_methods()
    for name, tuner in TUNERS.items():
        cls = methods[name]
        assert issubclass(cls, PeftTuner) and cls.can_merge == tuner.can_merge
        assert cls.supports_quantization == tuner.quantization and cls.description
    assert not set(UNAVAILABLE) & set(methods)
    assert methods["lily"].can_merge is False


# ------------------------------------------------------------------------ every tuner, tiny BERT

def build(tiny_bert, files, name: str, task: str, quantization: str = "none", seed: int = 0):
    method = {"name": name, **TINY_OPTIONS.get(name, {})}
    maker = ner_recipe if task == "token_classification" else cls_recipe
    data = maker(tiny_bert, files, Path("/nonexistent/out"), method)
    data["backbone"]["quantization"] = quantization
    r = recipe_from_dict(data)
    t = get_task_class(r.task)(r)
    t.set_labels(NER_LABELS if task == "token_classification" else CLS_LABELS)
    torch.manual_seed(seed)
    return build_model(r, t)


def batch_for(task: str) -> dict:
    ids = torch.tensor([[101, 7592, 2088, 2003, 2307, 102], [101, 2026, 4003, 2038, 102, 0]])
    mask = (ids != 0).long()
    if task == "token_classification":
        labels = torch.tensor([[-100, 1, 2, 0, 3, -100], [-100, 0, 3, 4, -100, -100]])
    else:
        labels = torch.tensor([0, 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_steps(built, batch, steps: int = 6, lr: float = 1e-2) -> list[float]:
    model = built.model
    trainable = built.method.trainable_parameters(model)
    opt = torch.optim.AdamW(trainable.values(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("task", ["token_classification", "sequence_classification"])
@pytest.mark.parametrize("name", sorted(TUNERS))
def test_tuner_trains_saves_loads_merges(tiny_bert, wnut_small, banking_small, tmp_path, name, task):
    files = wnut_small if task == "token_classification" else banking_small
    built = build(tiny_bert, files, name, task)
    trainable = built.method.trainable_parameters(built.model)
    heads = built.ctx.head_names
    assert heads == ["classifier"]
    adapter = {n: p.detach().clone() for n, p in trainable.items() if not is_head_parameter(n, heads)}
    assert adapter, "the tuner trains no parameters of its own"
    assert any(is_head_parameter(n, heads) for n in trainable), "the task head must train"
    frozen_backbone = [n for n, p in built.model.named_parameters()
                       if not p.requires_grad and not is_head_parameter(n, heads)]
    assert frozen_backbone  # the backbone itself stays frozen

    batch = batch_for(task)
    losses = train_steps(built, batch)
    assert losses[-1] < losses[0], losses
    moved = [n for n, p in built.method.trainable_parameters(built.model).items()
             if n in adapter and not torch.equal(p.detach(), adapter[n])]
    assert moved, "no adapter parameter changed"
    before = logits(built.model, batch)

    built.method.save(built.model, tmp_path, built.ctx)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == TUNERS[name].peft_type
    assert "classifier" in (saved.get("modules_to_save") or [])
    assert not list(tmp_path.glob("*.bin"))
    reloaded = built.method.load(tmp_path, built.ctx)
    assert torch.equal(logits(reloaded, batch), before)

    if built.method.can_merge:
        merged = built.method.merge(reloaded)
        assert type(merged).__name__.startswith("Bert") and not any("base_layer" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(logits(merged, batch), before, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(PeftlabError, match="cannot be merged"):
            built.method.merge(reloaded)


def hidden(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("name", sorted(n for n, t in TUNERS.items() if t.quantization))
def test_quantization_claim_holds(tiny_bert, wnut_small, tmp_path, name, quantization):
    """A tuner marked quantization-capable computes the same function on a quantized backbone: the
    change the adapter makes on the quantized base is the change it makes on the float base, up to
    the quantization error (a tuner that read the packed int8/4-bit storage as weights would produce
    an unrelated change), and it trains there (finite, non-zero gradients)."""
    task = "token_classification"
    batch = batch_for(task)
    fp = build(tiny_bert, wnut_small, name, task)
    train_steps(fp, batch, steps=4, lr=3e-2)
    # a few steps on a tiny batch barely move some tuners (IA3, VeRA scales): push every tuner weight
    # well away from its initialisation so the adapter, not the quantization, dominates the change.
    # (With 0.5 * randn, IA3 and RoAd on nf4 changed the function only 2.6x as much as quantization did
    # on an Intel Xeon; with 1.0 the smallest ratio there is 4.4, cos >= 0.96, rel <= 0.29 over all tuners.)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in fp.method.trainable_parameters(fp.model).items():
            if not is_head_parameter(n, fp.ctx.head_names):
                p.add_(1.0 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    fp.method.save(fp.model, tmp_path, fp.ctx)
    q = build(tiny_bert, wnut_small, name, task, quantization=quantization)
    base_fp, base_q = hidden(fp.ctx.load_base(), batch), hidden(q.ctx.load_base(), batch)
    delta_fp = hidden(fp.method.load(tmp_path, fp.ctx), batch) - base_fp
    delta_q = hidden(q.method.load(tmp_path, q.ctx), batch) - base_q
    base_err = (base_q - base_fp).norm() / base_fp.norm()
    assert base_err > 0  # the backbone really is quantized
    quant_change = (base_q - base_fp).norm()
    assert delta_fp.norm() > 3 * quant_change  # the adapter changes the function more than quantization
    cos = torch.nn.functional.cosine_similarity(delta_fp.flatten(), delta_q.flatten(), dim=0)
    rel = (delta_q - delta_fp).norm() / delta_fp.norm()
    assert cos > 0.9 and rel < 0.5, (float(cos), float(rel), float(base_err))

    model = q.model
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for n, p in q.method.trainable_parameters(model).items() if not is_head_parameter(n, q.ctx.head_names)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ------------------------------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def ia3_run(tiny_bert, wnut_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ia3"
    metrics = peftlab.train(ner_recipe(tiny_bert, wnut_small, out, {"name": "ia3"}, epochs=3, lr=5e-2,
                                       head_lr=1e-2, log_every=2))
    return out, metrics


def test_ia3_trains_through_the_trainer(ia3_run):
    out, metrics = ia3_run
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < losses[0] * 0.7, losses
    params = json.loads((out / "params.json").read_text())
    # peft's IA3 defaults for BERT: key, value (d each), attention-output and FFN-output inputs (d, inter)
    assert params["trainable_params_without_head"] == 2 * (32 + 32 + 32 + 64)
    n_labels = len(json.loads((out / "labels.json").read_text()))
    assert params["trainable_head_params"] == 32 * n_labels + n_labels
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and "classifier" in cfg["modules_to_save"]
    from safetensors.torch import load_file

    keys = load_file(str(out / "model" / "adapter_model.safetensors")).keys()
    assert any("classifier" in k for k in keys) and any("ia3_l" in k for k in keys)


def test_ia3_reload_and_merge(ia3_run):
    out, _ = ia3_run
    run = load_run(out)
    batch = run.tokenizer([["Paris", "is", "in", "France"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        a = run.model(**batch).logits
        assert torch.equal(a, load_run(out).model(**batch).logits)
        merged = run.method.merge(load_run(out).model)
        torch.testing.assert_close(merged(**batch).logits, a, atol=1e-5, rtol=1e-5)


def test_dora_runs_through_lora(tiny_bert, banking_small, tmp_path):
    out = tmp_path / "dora"
    metrics = peftlab.train(cls_recipe(tiny_bert, banking_small, out,
                                       {"name": "lora", "r": 4, "alpha": 8, "use_dora": True},
                                       epochs=3, lr=1e-2, log_every=2))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < losses[0], losses
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    params = json.loads((out / "params.json").read_text())
    # LoRA (r * (in + out)) plus DoRA's magnitude vector (out) per adapted linear layer
    shapes = [(32, 32)] * 4 + [(32, 64), (64, 32)]
    per_layer = sum(4 * (i + o) + o for i, o in shapes)
    assert params["trainable_params_without_head"] == 2 * per_layer + (4 * (32 + 32) + 32)  # + the pooler
    run = load_run(out)
    batch = run.tokenizer(["my card has not arrived"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(run.model(**batch).logits, load_run(out).model(**batch).logits)


def test_lora_modules_to_save_trains_the_pooler_in_full(tiny_bert, banking_small, tmp_path):
    out = tmp_path / "pooler"
    metrics = peftlab.train(cls_recipe(tiny_bert, banking_small, out,
                                       {"name": "lora", "r": 4, "alpha": 8, "modules_to_save": ["pooler"]},
                                       epochs=3, lr=1e-2, log_every=2))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < losses[0], losses
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert {"classifier", "pooler"} <= set(cfg["modules_to_save"])
    params = json.loads((out / "params.json").read_text())
    # LoRA on every encoder linear layer; the pooler trains in full instead of getting LoRA
    shapes = [(32, 32)] * 4 + [(32, 64), (64, 32)]
    assert params["trainable_params_without_head"] == 2 * sum(4 * (i + o) for i, o in shapes) + 32 * 32 + 32
    run = load_run(out)
    batch = run.tokenizer(["my card has not arrived"], return_tensors="pt")
    with torch.no_grad():
        before = run.model(**batch).logits
    merged = run.method.merge(load_run(out).model)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, before, atol=1e-5, rtol=1e-5)
    from transformers import AutoModel
    base_pooler = AutoModel.from_pretrained(tiny_bert).pooler.dense.weight
    assert not torch.equal(merged.bert.pooler.dense.weight, base_pooler)  # the trained copy, not the base's


def test_modules_to_save_typo_is_an_error(tiny_bert, banking_small, tmp_path):
    for method in ({"name": "lora", "modules_to_save": ["poolr"]}, {"name": "ia3", "modules_to_save": ["poolr"],
                                                                      **TINY_OPTIONS.get("ia3", {})}):
        with pytest.raises(PeftlabError, match=r"method.modules_to_save: 'poolr' matches no module of this bert model"):
            peftlab.train(cls_recipe(tiny_bert, banking_small, tmp_path / method["name"], method, epochs=1))
        assert not (tmp_path / method["name"]).exists()  # refused before the run folder is written


def test_lora_modules_to_save_refuses_a_quantized_module(tiny_bert, banking_small):
    data = cls_recipe(tiny_bert, banking_small, Path("/nonexistent/out"), {"name": "lora", "modules_to_save": ["pooler"]})
    data["backbone"]["quantization"] = "int8"
    r = recipe_from_dict(data)
    t = get_task_class(r.task)(r)
    t.set_labels(CLS_LABELS)
    with pytest.raises(PeftlabError, match=r"method.modules_to_save: bert.pooler.dense.weight is quantized "
                                           r".*backbone.unquantized_modules: \[pooler\]"):
        build_model(r, t)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_lora_trains_a_pooler_kept_unquantized(tiny_bert, banking_small, tmp_path, quantization):
    """backbone.unquantized_modules: [pooler] keeps bert.pooler.dense in float32 under int8/nf4 (the
    encoder stays quantized), so LoRA's modules_to_save can train it; it saves and reloads."""
    out = tmp_path / quantization
    data = cls_recipe(tiny_bert, banking_small, out, {"name": "lora", "r": 4, "alpha": 8, "modules_to_save": ["pooler"]},
                      epochs=2, lr=1e-2)
    data["backbone"].update(quantization=quantization, unquantized_modules=["pooler"])
    r = recipe_from_dict(data)
    t = get_task_class(r.task)(r)
    t.set_labels(CLS_LABELS)
    base = build_model(r, t).model.get_base_model()
    pooler = base.bert.pooler.modules_to_save["default"].dense
    assert type(pooler) is torch.nn.Linear and pooler.weight.dtype == torch.float32 and pooler.weight.requires_grad
    query = base.bert.encoder.layer[0].attention.self.query.base_layer
    assert type(query).__name__ in ("Linear8bitLt", "Linear4bit") and not query.weight.is_floating_point()
    peftlab.train(data)
    from transformers import AutoModel
    base_pooler = AutoModel.from_pretrained(tiny_bert).pooler.dense.weight
    run = load_run(out)
    trained = run.model.get_base_model().bert.pooler.modules_to_save["default"].dense.weight
    assert trained.dtype == torch.float32 and not torch.equal(trained, base_pooler)
    batch = run.tokenizer(["my card has not arrived"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(run.model(**batch).logits, load_run(out).model(**batch).logits)
    # merged (dequantized base + LoRA + the trained pooler) into a plain transformers checkpoint
    from peftlab.deploy import merge
    report = merge(out, tmp_path / "merged", verify_examples=8)
    assert report["kind"] == "dequantized" and report["passed"], report
    from transformers import AutoModelForSequenceClassification
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged.bert.pooler.dense.weight, trained)


def test_unquantized_modules_typo_is_an_error(tiny_bert, banking_small, tmp_path):
    data = cls_recipe(tiny_bert, banking_small, tmp_path / "out", {"name": "lora"}, epochs=1)
    data["backbone"].update(quantization="int8", unquantized_modules=["poolr"])
    with pytest.raises(PeftlabError, match=r"^backbone.unquantized_modules: 'poolr' matches no module of this bert model"):
        peftlab.train(data)
    assert not (tmp_path / "out").exists()
