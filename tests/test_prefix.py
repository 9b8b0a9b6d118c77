"""Prefix tuning: the attention it computes, the zero-prefix relation, counts, generation, training, reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import cls_recipe, ner_recipe
from peftlab.errors import PeftlabError
from peftlab.methods.prefix import (
    PrefixOptions,
    add_prefix,
    find_attention_modules,
    get_prefix_encoder,
    prefix_attention,
    prefix_disabled,
)
from peftlab.recipe import recipe_from_dict
from peftlab.runs import BEST_DIR, CHECKPOINTS_DIR, build_model, load_run, parameter_report
from peftlab.tasks import get_task_class
from test_adapter import MINILM, apply_method, tiny_llama, trainable_without_head


def tiny_bert_model(path, cls_name="BertForTokenClassification", attn="sdpa", **kw):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name).from_pretrained(path, attn_implementation=attn, **kw).eval()


def bert_batch():
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(1000, 2000, (2, 7), generator=g),
            "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}


def randomize_prefix(model, std=1.0, seed=5):
    g = torch.Generator().manual_seed(seed)
    p = get_prefix_encoder(model).prefix
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------- the attention it computes


@pytest.mark.parametrize("causal, masked", [(False, False), (False, True), (True, False), (True, True)])
def test_prefix_attention_matches_hand_computation(causal, masked):
    """softmax([q.Kp, q.K] * scale + [0, mask]) @ [Vp; V], with the real implementation (sdpa) inside."""
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    add_prefix(model, PrefixOptions(num_virtual_tokens=3, init_std=1.0))
    module = model.model.layers[1].self_attn  # 4 query heads, 2 key/value heads (GQA)
    module.is_causal = causal
    g = torch.Generator().manual_seed(0)
    B, T, P, hd = 2, 5, 3, 8
    q, k, v = (torch.randn(B, n, T, hd, generator=g) for n in (4, 2, 2))
    mask = None
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    if masked:
        allowed[1, :, :, 3:] = False  # the second sequence's last 2 keys are padding
        mask = allowed.clone()
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
        if mask is not None:
            mask = allowed.clone()
    out, _ = prefix_attention(module, q, k, v, mask, scaling=module.scaling, dropout=0.0)
    kv = get_prefix_encoder(model).layer_kv(1)
    keys = torch.cat([kv[0].expand(B, -1, -1, -1), k], 2).repeat_interleave(2, dim=1)
    values = torch.cat([kv[1].expand(B, -1, -1, -1), v], 2).repeat_interleave(2, dim=1)
    logits = q @ keys.transpose(2, 3) * module.scaling
    visible = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), allowed], -1)
    expected = (logits.masked_fill(~visible, float("-inf")).softmax(-1) @ values).transpose(1, 2)
    assert out.shape == (B, T, 4, hd)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


@pytest.mark.parametrize("kind", ["bert_token", "bert_sequence", "llama_causal", "llama_sequence"])
def test_sdpa_and_eager_agree_and_disabled_prefix_is_the_bare_model(tiny_bert, kind):
    outputs = {}
    for attn in ("sdpa", "eager"):
        if kind.startswith("bert"):
            cls = "BertForTokenClassification" if kind == "bert_token" else "BertForSequenceClassification"
            model = tiny_bert_model(tiny_bert, cls, attn, num_labels=4)
            batch = bert_batch()
        else:
            cls = "LlamaForCausalLM" if kind == "llama_causal" else "LlamaForSequenceClassification"
            model = tiny_llama(cls, num_labels=4)
            model.config._attn_implementation = attn
            batch = {"input_ids": torch.randint(1, 128, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [0, 0] + [1] * 4])}
        with torch.no_grad():
            bare = model(**batch).logits
            add_prefix(model, PrefixOptions(num_virtual_tokens=4))
            randomize_prefix(model)
            with_prefix = model(**batch).logits
            with prefix_disabled(model):
                disabled = model(**batch).logits
        assert torch.equal(disabled, bare)
        assert with_prefix.shape == bare.shape  # no virtual-token outputs
        assert (with_prefix - bare).abs().max() > 1e-4
        outputs[attn] = with_prefix
    assert torch.allclose(outputs["sdpa"], outputs["eager"], atol=1e-5)


def _spy_sdpa(monkeypatch, layer0):
    """Record query, key, mask and output of the first layer's sdpa call (the bare model's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    real = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = {}

    def spy(module, query, key, value, mask, **kwargs):
        out = real(module, query, key, value, mask, **kwargs)
        if module is layer0 and "query" not in seen:
            seen.update(query=query, key=key, mask=mask, out=out[0], scaling=kwargs.get("scaling"),
                        causal=getattr(module, "is_causal", True))
        return out

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    return seen


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_zero_prefix_rescales_attention_by_z_over_z_plus_p(tiny_bert, monkeypatch, kind):
    """Zero keys and values: each real query gets P extra logits 0 and values 0, so its attention output
    is the bare one times Z / (Z + P), Z = sum over the keys it sees of exp(scaled logit)."""
    P = 5
    if kind == "bert":
        model = tiny_bert_model(tiny_bert, num_labels=3)
        layer0 = model.bert.encoder.layer[0].attention.self
        batch = bert_batch()  # padded: a bool mask
    else:
        model = tiny_llama()
        layer0 = model.model.layers[0].self_attn
        batch = {"input_ids": torch.randint(1, 128, (2, 6))}  # no mask: sdpa's is_causal path
    seen = _spy_sdpa(monkeypatch, layer0)
    with torch.no_grad():
        model(**batch)
        add_prefix(model, PrefixOptions(num_virtual_tokens=P, init_std=0.0))
        assert get_prefix_encoder(model).prefix.abs().sum() == 0
        captured = {}
        if kind == "bert":  # BertSelfAttention returns the attention output before its projection
            handle = layer0.register_forward_hook(lambda m, a, out: captured.setdefault("out", out[0]))
        else:  # LlamaAttention projects it: take o_proj's input
            handle = layer0.o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("out", a[0]))
        model(**batch)
        handle.remove()
    q, k = seen["query"], seen["key"]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q @ k.transpose(2, 3) * seen["scaling"]
    mask = seen["mask"]
    if mask is None and seen["causal"]:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    Z = logits.exp().sum(-1)  # (B, H, T)
    ratio = (Z / (Z + P)).transpose(1, 2).unsqueeze(-1)  # (B, T, H, 1)
    bare = seen["out"]  # (B, T, H, hd)
    with_prefix = captured["out"].view(bare.shape)
    assert torch.all(ratio < 1)
    assert torch.allclose(with_prefix, bare * ratio, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(with_prefix, bare, atol=1e-4)


# ------------------------------------------------------------------------------------ decoders


@pytest.mark.parametrize("reparameterize", [False, True])
def test_llama_forward_backward_and_generate(reparameterize):
    model = tiny_llama()
    apply_method(model, "prefix", [], num_virtual_tokens=4, reparameterize=reparameterize,
                 encoder_hidden_size=16, init_std=0.5)
    ids = torch.randint(1, 128, (2, 7))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(n.startswith("peftlab_prefix.") for n in grads)
    model.eval()
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])  # left padding
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        # the same greedy decoding by hand, recomputing the whole sequence without a cache
        seq, m = ids, mask
        for _ in range(5):
            pos = (m.cumsum(-1) - 1).clamp(min=0)  # generate()'s positions under left padding
            nxt = model(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
        with prefix_disabled(model):
            bare = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, seq)
    assert generated.shape == (2, 12)
    assert not torch.equal(generated, bare)


def test_llama_sequence_classification_backward():
    model = tiny_llama("LlamaForSequenceClassification", num_labels=3)
    apply_method(model, "prefix", ["score"], num_virtual_tokens=2)
    ids = torch.randint(1, 128, (3, 6))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert out.logits.shape == (3, 3)
    assert model.score.weight.grad is not None and get_prefix_encoder(model).prefix.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ parameter counts


def test_tiny_counts_direct_and_reparameterized():
    P, L = 6, 2
    model = tiny_llama()  # hidden 32, 4 heads of 8, 2 key/value heads
    apply_method(model, "prefix", ["lm_head"], num_virtual_tokens=P)
    assert trainable_without_head(model, ["lm_head"]) == L * 2 * P * 2 * 8  # n_kv * head_dim = 16, not d
    model = tiny_llama(num_key_value_heads=4)
    apply_method(model, "prefix", ["lm_head"], num_virtual_tokens=P)
    assert trainable_without_head(model, ["lm_head"]) == L * 2 * P * 32  # L x 2 x P x d
    model = tiny_llama(num_key_value_heads=4)
    h, d = 24, 32
    apply_method(model, "prefix", ["lm_head"], num_virtual_tokens=P, reparameterize=True, encoder_hidden_size=h)
    assert trainable_without_head(model, ["lm_head"]) == P * d + (d * h + h) + (h * L * 2 * d + L * 2 * d)


@pytest.mark.parametrize("backbone, d, L", [("tiny", 32, 2), (MINILM, 384, 6)])
def test_bert_count_matches_formula(tiny_bert, wnut_small, tmp_path, backbone, d, L):
    P = 20
    name = str(tiny_bert) if backbone == "tiny" else backbone
    recipe = recipe_from_dict(ner_recipe(name, wnut_small, tmp_path / "x", {"name": "prefix", "num_virtual_tokens": P}))
    task = get_task_class(recipe.task)(recipe)
    task.set_labels(["O", "B-a", "I-a"])
    report = parameter_report(build_model(recipe, task))
    assert report["trainable_params_without_head"] == L * 2 * P * d  # MiniLM: 92,160
    assert report["trainable_head_params"] == d * 3 + 3
    assert report["method_added_params"] == L * 2 * P * d


def test_unsupported_attention_implementation_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(PeftlabError, match="prefix tuning supports the attention implementations sdpa, eager"):
        add_prefix(model, PrefixOptions())
    with pytest.raises(PeftlabError, match="method.attention_module: no module 'nope'"):
        add_prefix(tiny_llama(), PrefixOptions(attention_module="nope"))


def _spy_all_layers(monkeypatch) -> dict:
    """Record every attention module's keys and values as its sdpa call receives them."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    real, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], {}

    def spy(module, query, key, value, mask, **kwargs):
        seen.setdefault(module, torch.stack([key[0], value[0]]).clone())
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    return seen


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_vocab_init_is_the_frozen_models_keys_and_values_for_drawn_tokens(tiny_bert, monkeypatch, kind):
    """init: vocab -> each layer's prefix is the (key, value) that layer computes for P token ids drawn
    with torch's generator (keys after RoPE for Llama, grouped key/value heads kept)."""
    P = 5
    model = tiny_bert_model(tiny_bert, "BertForTokenClassification", num_labels=3) if kind == "bert" else tiny_llama()
    model.config._attn_implementation = "sdpa"
    attention = [m for _, m in find_attention_modules(model, PrefixOptions())]
    vocab = model.get_input_embeddings().weight.shape[0]
    torch.manual_seed(11)
    ids = torch.randint(0, vocab, (1, P))
    seen = _spy_all_layers(monkeypatch)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = torch.stack([seen[m] for m in attention])  # (L, 2, n_kv, P, head_dim)
    model.train()
    torch.manual_seed(11)
    encoder = add_prefix(model, PrefixOptions(num_virtual_tokens=P, init="vocab"))
    assert encoder.prefix.shape == expected.shape
    assert torch.allclose(encoder.prefix, expected, atol=1e-6)
    assert expected.abs().max() > 0.1  # not the random init's scale
    assert model.training and encoder.enabled and encoder.prefix.requires_grad
    model(input_ids=ids).logits.sum().backward()
    assert encoder.prefix.grad.abs().sum() > 0


def test_vocab_init_with_reparameterize_is_refused(tiny_bert, wnut_small, tmp_path):
    method = {"name": "prefix", "init": "vocab", "reparameterize": True}
    with pytest.raises(PeftlabError, match="method: .*init 'vocab' sets the prefix itself"):
        recipe_from_dict(ner_recipe(tiny_bert, wnut_small, tmp_path / "x", method))


# ------------------------------------------------------------------------- training and reloading


def predict(model, tok):
    batch = tok([["Paris", "is", "in", "France"], ["hello"]], is_split_into_words=True, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def prefix_ner_run(tiny_bert, wnut_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "prefix"
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "prefix", "num_virtual_tokens": 8}, epochs=3, lr=2e-2, log_every=3,
                        num_threads=1)
    return out, peftlab.train(recipe)


def test_prefix_ner_loss_falls_and_reloads_identically(prefix_ner_run):
    out, metrics = prefix_ner_run
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    params = json.loads((out / "params.json").read_text())
    assert params["trainable_params_without_head"] == 2 * 2 * 8 * 32
    state = load_file(str(out / "model" / "peftlab_weights.safetensors"))
    assert set(state) == {"peftlab_prefix.prefix", "classifier.weight", "classifier.bias"}
    run = load_run(out)
    assert torch.equal(run.model.peftlab_prefix.prefix, state["peftlab_prefix.prefix"])
    assert torch.equal(predict(run.model, run.tokenizer), predict(load_run(out).model, run.tokenizer))
    with pytest.raises(PeftlabError, match="method 'prefix' cannot be merged"):
        run.method.merge(run.model)


def test_reparameterized_prefix_saves_only_the_prefix(tiny_bert, wnut_small, tmp_path):
    out = tmp_path / "run"
    method = {"name": "prefix", "num_virtual_tokens": 4, "reparameterize": True, "encoder_hidden_size": 16}
    metrics = peftlab.train(ner_recipe(tiny_bert, wnut_small, out, method, epochs=2, lr=5e-3, log_every=3, num_threads=1))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.8 * losses[0], losses
    params = json.loads((out / "params.json").read_text())
    assert params["trainable_params_without_head"] == 4 * 32 + (32 * 16 + 16) + (16 * 2 * 2 * 32 + 2 * 2 * 32)
    state = load_file(str(out / "model" / "peftlab_weights.safetensors"))
    assert set(state) == {"peftlab_prefix.prefix", "classifier.weight", "classifier.bias"}  # no MLP
    assert state["peftlab_prefix.prefix"].shape == (2, 2, 2, 4, 16)
    run = load_run(out)
    # the training-time model (MLP) restored from the best checkpoint predicts the same
    task = get_task_class(run.recipe.task)(run.recipe)
    task.set_labels(run.task.labels)
    built = build_model(run.recipe, task)
    from peftlab.methods import load_trainable_state

    best = load_file(str(out / CHECKPOINTS_DIR / BEST_DIR / "trainable.safetensors"))
    assert any(k.startswith("peftlab_prefix.mlp.") for k in best)
    load_trainable_state(built.model, best, "best")
    built.model.eval()
    assert torch.allclose(predict(built.model, run.tokenizer), predict(run.model, run.tokenizer), atol=1e-5)


def test_prefix_classification_trains_and_reloads(tiny_bert, banking_small, tmp_path):
    out = tmp_path / "run"
    peftlab.train(cls_recipe(tiny_bert, banking_small, out, {"name": "prefix", "num_virtual_tokens": 4},
                             epochs=1, lr=1e-2, batch_size=8, num_threads=1))
    run = load_run(out)
    batch = run.tokenizer(["my card has not arrived", "what is the exchange rate"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = run.model(**batch).logits
        b = load_run(out).model(**batch).logits
        with prefix_disabled(run.model):
            bare = run.model(**batch).logits
    assert a.shape == (2, 6) and torch.equal(a, b)
    assert not torch.allclose(a, bare)


@pytest.mark.integration
def test_minilm_prefix_classification_loss_falls(banking_small, tmp_path):
    metrics = peftlab.train(cls_recipe(MINILM, banking_small, tmp_path / "run", {"name": "prefix", "num_virtual_tokens": 10},
                                       max_steps=36, lr=2e-2, batch_size=8, log_every=4, num_threads=1))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert metrics["test"]["accuracy"] > 0.5  # 6 intents, chance 1/6


@pytest.mark.parametrize("quantization, linear_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_prefix_on_quantized_backbone_trains_and_reloads(tiny_bert, wnut_small, tmp_path, quantization, linear_class):
    out = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "prefix", "num_virtual_tokens": 4}, epochs=2, lr=1e-2,
                        log_every=3, num_threads=1)
    recipe["backbone"]["quantization"] = quantization
    metrics = peftlab.train(recipe)
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    run = load_run(out)
    assert type(run.model.bert.encoder.layer[0].attention.self.key).__name__ == linear_class
    assert run.model.peftlab_prefix.prefix.dtype == torch.float32
    batch = run.tokenizer([["Paris", "is", "nice"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        a = run.model(**batch).logits
        assert torch.equal(a, load_run(out).model(**batch).logits)
        with prefix_disabled(run.model):
            assert not torch.allclose(a, run.model(**batch).logits)
