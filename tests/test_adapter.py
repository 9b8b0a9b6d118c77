"""Bottleneck adapters: identity at init, exact parameter counts, training, save/load, merge refusal."""
# Training runs here use train.num_threads=1: on a CPU shared with other jobs two threads per process
# were measured 8x slower (36 MiniLM steps: 254 s with 2 threads, 33 s with 1).

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import cls_recipe, ner_recipe, rescore_test
from peftlab.errors import PeftlabError
from peftlab.methods import MethodContext, get_method_class
from peftlab.methods.adapter import AdapterOptions, add_adapters
from peftlab.recipe import BackboneConfig, recipe_from_dict
from peftlab.runs import build_model, load_run, parameter_report
from peftlab.tasks import get_task_class

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def adapter_count(d: int, layers: int, factor: int, placement: str) -> int:
    m = d // factor
    per = 2 * d * m + m + d
    return (2 if placement == "houlsby" else 1) * layers * per


def tiny_llama(cls_name: str = "LlamaForCausalLM", **extra):
    import transformers
    from transformers import LlamaConfig

    torch.manual_seed(0)
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config = LlamaConfig(**{**kwargs, **extra})
    return getattr(transformers, cls_name)(config).eval()


def apply_method(model, name: str, head_names: list[str], **options):
    cls = get_method_class(name)
    ctx = MethodContext(task=None, backbone=BackboneConfig(name="tiny"), head_names=head_names)
    return cls(cls.Options(**options)).apply(model, ctx)


def trainable_without_head(model, head_names: list[str]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in head_names)


# ------------------------------------------------------------------------ identity at initialisation


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "tanh"])
def test_untrained_adapter_is_identity_on_tiny_bert(tiny_bert, placement, non_linearity):
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=5).eval()
    batch = {"input_ids": torch.randint(1000, 2000, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    with torch.no_grad():
        bare = model(**batch).logits
        apply_method(model, "adapter", ["classifier"], placement=placement, non_linearity=non_linearity)
        wrapped = model(**batch).logits
    assert torch.equal(bare, wrapped)
    adapters = [n for n, _ in model.named_modules() if n.endswith(".adapter")]
    assert len(adapters) == (4 if placement == "houlsby" else 2)


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "LlamaForSequenceClassification"])
def test_untrained_adapter_is_identity_on_tiny_llama(cls_name):
    model = tiny_llama(cls_name, num_labels=3)
    head = "lm_head" if cls_name == "LlamaForCausalLM" else "score"
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        bare = model(input_ids=ids).logits
        apply_method(model, "adapter", [head])
        wrapped = model(input_ids=ids).logits
    assert torch.equal(bare, wrapped)
    names = sorted(n for n, _ in model.named_modules() if n.endswith(".adapter"))
    assert names == [f"model.layers.{i}.{t}.adapter" for i in (0, 1) for t in ("mlp.down_proj", "self_attn.o_proj")]


def test_adapter_trains_and_changes_outputs_after_a_step():
    model = tiny_llama()
    apply_method(model, "adapter", [], reduction_factor=4)
    ids = torch.randint(1, 128, (2, 9))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    before = model(input_ids=ids, labels=ids)
    before.loss.backward()
    up = model.model.layers[0].mlp.down_proj.adapter.up.weight
    assert up.grad is not None and up.grad.abs().sum() > 0  # zero init still gets a gradient
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids)
    assert not torch.equal(before.logits.detach(), after.logits)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "model.layers.0.self_attn.q_proj.weight" in frozen and "lm_head.weight" in frozen


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_tiny_llama_adapter_count(placement):
    model = tiny_llama()
    apply_method(model, "adapter", ["lm_head"], placement=placement, reduction_factor=8)
    assert trainable_without_head(model, ["lm_head"]) == adapter_count(32, 2, 8, placement)


def build_ner(backbone, files, tmp_path, method) -> dict:
    recipe = recipe_from_dict(ner_recipe(backbone, files, tmp_path / "x", method))
    task = get_task_class(recipe.task)(recipe)
    task.set_labels(["O", "B-a", "I-a", "B-b", "I-b"])
    return parameter_report(build_model(recipe, task))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_tiny_bert_adapter_count(tiny_bert, wnut_small, tmp_path, placement):
    report = build_ner(tiny_bert, wnut_small, tmp_path, {"name": "adapter", "placement": placement, "reduction_factor": 8})
    assert report["trainable_params_without_head"] == adapter_count(32, 2, 8, placement)
    assert report["trainable_head_params"] == 32 * 5 + 5
    assert report["method_added_params"] == adapter_count(32, 2, 8, placement)


@pytest.mark.parametrize("placement, expected", [("houlsby", 226_080), ("pfeiffer", 113_040)])
def test_minilm_adapter_count_matches_formula(wnut_small, tmp_path, placement, expected):
    report = build_ner(MINILM, wnut_small, tmp_path, {"name": "adapter", "placement": placement, "reduction_factor": 16})
    assert expected == adapter_count(384, 6, 16, placement)
    assert report["trainable_params_without_head"] == expected
    assert report["trainable_head_params"] == 384 * 5 + 5
    assert report["backbone_params"] == 22_565_376


# ------------------------------------------------------------------------------ options and errors


def test_explicit_target_modules_and_errors():
    model = tiny_llama()
    adapted = add_adapters(model, AdapterOptions(attention_module="self_attn.v_proj", ffn_module="mlp.up_proj"))
    assert adapted == [f"model.layers.{i}.{t}" for i in (0, 1) for t in ("self_attn.v_proj", "mlp.up_proj")]
    assert model.model.layers[0].mlp.up_proj.adapter.up.out_features == 64  # the projection's own width
    with pytest.raises(PeftlabError, match="already has an adapter"):
        add_adapters(model, AdapterOptions(attention_module="self_attn.v_proj", ffn_module="mlp.up_proj"))
    with pytest.raises(PeftlabError, match=r"method.ffn_module: no module 'mlp.nope' .*mlp.down_proj"):
        add_adapters(tiny_llama(), AdapterOptions(placement="pfeiffer", ffn_module="mlp.nope"))
    with pytest.raises(PeftlabError, match="method.reduction_factor: 64 leaves no bottleneck"):
        add_adapters(tiny_llama(), AdapterOptions(reduction_factor=64))


def test_recipe_rejects_unknown_adapter_option(tiny_bert, wnut_small, tmp_path):
    with pytest.raises(PeftlabError, match="method"):
        recipe_from_dict(ner_recipe(tiny_bert, wnut_small, tmp_path, {"name": "adapter", "bottleneck": 3}))
    with pytest.raises(PeftlabError, match="placement"):
        recipe_from_dict(ner_recipe(tiny_bert, wnut_small, tmp_path, {"name": "adapter", "placement": "middle"}))


# ------------------------------------------------------------------------- training and reloading


@pytest.fixture(scope="module")
def adapter_ner_run(tiny_bert, wnut_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "adapter"
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "adapter", "reduction_factor": 4}, epochs=3, lr=1e-2, log_every=3,
                        num_threads=1)
    return out, peftlab.train(recipe)


def test_adapter_ner_loss_falls(adapter_ner_run):
    out, metrics = adapter_ner_run
    losses = [loss for _, loss in metrics["train_loss"]]
    assert len(losses) >= 4
    assert losses[-1] < 0.7 * losses[0], losses
    params = json.loads((out / "params.json").read_text())
    n = len(json.loads((out / "labels.json").read_text()))
    assert params["trainable_params_without_head"] == adapter_count(32, 2, 4, "houlsby")
    assert params["trainable_head_params"] == 32 * n + n


def test_adapter_saved_as_safetensors_and_reloads_identically(adapter_ner_run):
    out, _ = adapter_ner_run
    model_dir = out / "model"
    keys = set(load_file(str(model_dir / "peftlab_weights.safetensors")))
    assert "classifier.weight" in keys
    assert "bert.encoder.layer.1.attention.output.dense.adapter.up.weight" in keys
    assert not any("query" in k or "word_embeddings" in k for k in keys)  # the frozen backbone is not saved
    info = json.loads((model_dir / "peftlab_method.json").read_text())
    assert info["method"] == "adapter" and info["options"]["placement"] == "houlsby"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    run = load_run(out)
    ups = [m.adapter.up.weight for n, m in run.model.named_modules() if hasattr(m, "adapter")]
    assert len(ups) == 4 and all(u.abs().sum() > 0 for u in ups)  # trained, not the zero init
    batch = run.tokenizer([["Paris", "is", "in", "France"], ["hello"]], is_split_into_words=True,
                          return_tensors="pt", padding=True)
    with torch.no_grad():
        a = run.model(**batch).logits
        b = load_run(out).model(**batch).logits
    assert torch.equal(a, b)


def test_adapter_test_metric_recomputed_from_saved_model(adapter_ner_run):
    out, metrics = adapter_ner_run
    again = rescore_test(load_run(out))
    assert again["f1"] == pytest.approx(metrics["test"]["f1"], abs=1e-9)
    assert again["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def test_adapter_cannot_merge(adapter_ner_run):
    out, _ = adapter_ner_run
    run = load_run(out)
    assert run.method.can_merge is False
    with pytest.raises(PeftlabError, match="method 'adapter' cannot be merged"):
        run.method.merge(run.model)


def test_pfeiffer_adapter_classification_trains_and_reloads(tiny_bert, banking_small, tmp_path):
    """Mechanics on the tiny random BERT: its frozen [CLS] features hardly depend on the input, so no
    frozen-backbone method lowers a classification loss on it; the MiniLM test below shows learning."""
    out = tmp_path / "run"
    method = {"name": "adapter", "placement": "pfeiffer", "reduction_factor": 4, "non_linearity": "gelu"}
    peftlab.train(cls_recipe(tiny_bert, banking_small, out, method, epochs=1, lr=1e-2, batch_size=8, num_threads=1))
    run = load_run(out)
    assert sorted(n for n, _ in run.model.named_modules() if n.endswith(".adapter")) == [
        f"bert.encoder.layer.{i}.output.dense.adapter" for i in (0, 1)
    ]
    assert all(m.adapter.up.weight.abs().sum() > 0 for m in run.model.modules() if hasattr(m, "adapter"))
    batch = run.tokenizer(["my card has not arrived", "what is the exchange rate"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = run.model(**batch).logits
        b = load_run(out).model(**batch).logits
    assert a.shape == (2, 6) and torch.equal(a, b)


@pytest.mark.integration
def test_minilm_adapter_classification_loss_falls(banking_small, tmp_path):
    metrics = peftlab.train(cls_recipe(MINILM, banking_small, tmp_path / "run", {"name": "adapter"},
                                       max_steps=36, lr=3e-3, batch_size=8, log_every=4, num_threads=1))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert metrics["test"]["accuracy"] > 0.5  # 6 intents, chance 1/6


@pytest.mark.parametrize("quantization, linear_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_adapter_on_quantized_backbone_trains_and_reloads(tiny_bert, wnut_small, tmp_path, quantization, linear_class):
    out = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "adapter", "reduction_factor": 4}, epochs=2, lr=1e-2,
                        log_every=3, num_threads=1)
    recipe["backbone"]["quantization"] = quantization
    metrics = peftlab.train(recipe)
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    run = load_run(out)
    proj = run.model.bert.encoder.layer[0].attention.output.dense
    assert type(proj).__name__ == linear_class and proj.weight.dtype in (torch.int8, torch.uint8)
    assert proj.adapter.down.weight.dtype == torch.float32 and run.model.classifier.weight.dtype == torch.float32
    batch = run.tokenizer([["Paris", "is", "nice"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(run.model(**batch).logits, load_run(out).model(**batch).logits)


def test_adapter_modules_to_save_trains_the_pooler_in_full(tiny_bert, banking_small, tmp_path):
    out = tmp_path / "run"
    method = {"name": "adapter", "placement": "pfeiffer", "reduction_factor": 4, "modules_to_save": ["pooler"]}
    peftlab.train(cls_recipe(tiny_bert, banking_small, out, method, epochs=1, lr=1e-2, batch_size=8, num_threads=1))
    params = json.loads((out / "params.json").read_text())
    assert params["trainable_params_without_head"] == adapter_count(32, 2, 4, "pfeiffer") + 32 * 32 + 32
    saved = load_file(str(out / "model" / "peftlab_weights.safetensors"))
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(saved)
    from transformers import AutoModel
    base = AutoModel.from_pretrained(tiny_bert).pooler.dense.weight
    assert not torch.equal(saved["bert.pooler.dense.weight"], base)  # trained
    run = load_run(out)
    assert torch.equal(run.model.bert.pooler.dense.weight, saved["bert.pooler.dense.weight"])
    batch = run.tokenizer(["my card has not arrived"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(run.model(**batch).logits, load_run(out).model(**batch).logits)


def test_adapter_modules_to_save_refuses_typos_and_quantized_modules(tiny_bert, banking_small, tmp_path):
    method = {"name": "adapter", "modules_to_save": ["poolr"]}
    with pytest.raises(PeftlabError, match=r"method.modules_to_save: 'poolr' matches no module of this bert model"):
        peftlab.train(cls_recipe(tiny_bert, banking_small, tmp_path / "typo", method, epochs=1))
    data = cls_recipe(tiny_bert, banking_small, tmp_path / "q", {"name": "adapter", "modules_to_save": ["pooler"]})
    data["backbone"]["quantization"] = "int8"
    r = recipe_from_dict(data)
    t = get_task_class(r.task)(r)
    t.set_labels(["a", "b", "c"])
    with pytest.raises(PeftlabError, match=r"method.modules_to_save: bert.pooler.dense.weight is quantized"):
        build_model(r, t)
