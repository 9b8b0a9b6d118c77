"""peftlab's LoRA training path (methods/lora_fast.py) against peft's own forward on the same weights:
same outputs and gradients (without dropout exactly the same expression; with dropout the same
expression under the mask the path drew), shared masks for layers that read one tensor, the dropout
rate, the fallbacks, and adapters that plain peft loads."""

from __future__ import annotations

import pytest
import torch

from peftlab.methods import lora_fast, lora_inputs

TOKEN = "AutoModelForTokenClassification"


def _peft_bert(tiny_bert, dropout: float, quantization: str = "none", **lora):
    from peft import LoraConfig, get_peft_model

    from peftlab.backbones import load_model
    from peftlab.recipe import BackboneConfig

    torch.manual_seed(0)
    base = load_model(BackboneConfig(name=str(tiny_bert), quantization=quantization), TOKEN,
                      {"num_labels": 5}, device=torch.device("cpu"))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                     modules_to_save=["classifier"], task_type="TOKEN_CLS", **lora)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # B starts at zero in peft: give it values so the branch counts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _batch(n=3, length=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 3000, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    labels = torch.randint(0, 5, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _disable_model_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and not any(m is d for layer in lora_fast.lora_layers(model)
                                                      for d in layer.lora_dropout.values()):
            m.p = 0.0


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_same_logits_and_gradients_as_peft_without_dropout(tiny_bert, quantization):
    model = _peft_bert(tiny_bert, 0.0, quantization)
    model.train()
    _disable_model_dropout(model)
    batch = _batch()
    ref_logits, ref_grads = _loss_and_grads(model, batch)
    assert lora_fast.install(model) == 12  # 2 layers x 6 linear; the head is saved in full
    logits, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    lora_fast.uninstall(model)
    again, _ = _loss_and_grads(model, batch)
    torch.testing.assert_close(again, ref_logits, rtol=0, atol=0)


def _graph_nodes(tensor) -> set[str]:
    seen, names, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("quantization, own", [("int8", "MatMul8bitFpBackward"), ("nf4", "MatMul4BitBackward")])
def test_quantized_base_runs_with_its_branch_in_one_function(tiny_bert, quantization, own):
    """On a CPU, bitsandbytes trains an int8 layer with ``MatMul8bitFp``, which keeps the layer's
    input for backward although the weight is frozen, and a 4-bit one apart from the LoRA branch (more
    output-sized temporaries); the fast path computes the dequantized matmul with the branch itself."""
    model = _peft_bert(tiny_bert, 0.1, quantization)
    model.train()
    batch = _batch()
    assert own in _graph_nodes(model(**batch).loss)
    lora_fast.install(model)
    nodes = _graph_nodes(model(**batch).loss)
    assert own not in nodes and "_LoraLinearBackward" in nodes


def test_dropout_gradients_match_peft_under_the_same_mask(tiny_bert):
    """With dropout on, peft's expression evaluated with the masks the fast path drew gives the same
    logits and gradients: the path changes how the mask is drawn and what is saved, not the function."""
    p = 0.3
    model = _peft_bert(tiny_bert, p)
    model.train()
    _disable_model_dropout(model)
    lora_fast.install(model)
    batch = _batch()
    masks: dict = {}
    real = lora_inputs.keep_mask

    def recording(shape, prob, seed, device):
        mask = real(shape, prob, seed, device)
        masks.setdefault(seed, mask)
        return mask

    lora_inputs.keep_mask = recording
    try:
        logits, grads = _loss_and_grads(model, batch)
    finally:
        lora_inputs.keep_mask = real
    # layers that read one tensor drew one mask: 2 layers x (qkv, attention output, ffn in, ffn out)
    assert len(masks) == 8
    replay = iter(masks.values())
    layers = lora_fast.lora_layers(model)
    lora_fast.uninstall(model)
    inputs: list = []  # (input, its mask); holding the input keeps its address from being reused

    class Replay(torch.nn.Module):  # peft's dropout module, drawing the recorded masks in order
        def forward(self, x):
            mask = next((m for seen, m in inputs if seen is x), None)
            if mask is None:
                mask = next(replay)
                inputs.append((x, mask))
            return x.masked_fill(mask == 0, 0.0) / (1 - p)

    for layer in layers:
        layer.lora_dropout["default"] = Replay()
    ref_logits, ref_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_run_seed_fixes_the_masks(tiny_bert):
    model = _peft_bert(tiny_bert, 0.2)
    model.train()
    lora_fast.install(model)
    batch = _batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(_loss_and_grads(model, batch)[0])
    torch.manual_seed(6)
    other = _loss_and_grads(model, batch)[0]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], other)


def test_eval_is_peft_eval(tiny_bert):
    model = _peft_bert(tiny_bert, 0.2)
    model.eval()
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch).logits
        lora_fast.install(model)
        fast = model(**batch).logits
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_falls_back_to_peft_where_it_does_not_apply(tiny_bert):
    model = _peft_bert(tiny_bert, 0.1, use_dora=True)
    lora_fast.install(model)
    model.train()
    calls = []
    real = lora_fast._LoraLinear.apply
    lora_fast._LoraLinear.apply = lambda *a: calls.append(1) or real(*a)
    try:
        model(**_batch()).loss.backward()
        assert calls == []  # DoRA: peft's own forward on every layer
    finally:
        lora_fast._LoraLinear.apply = real
    with model.disable_adapter():
        layer = lora_fast.lora_layers(model)[0]
        assert lora_fast._fast_applies(layer, torch.zeros(1, 32), (), {}) is None


def test_trained_adapter_loads_in_plain_peft(tiny_bert, wnut_small, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    from peftlab.api import train
    from peftlab.runs import load_run
    from tests.conftest import ner_recipe

    recipe = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 4, "alpha": 8}, max_steps=6)
    train(recipe)
    run = load_run(tmp_path / "run")
    assert lora_fast.lora_layers(run.model) and all("forward" in vars(m) for m in lora_fast.lora_layers(run.model))
    labels = run.task.labels
    base = AutoModelForTokenClassification.from_pretrained(
        str(tiny_bert), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    plain = PeftModel.from_pretrained(base, str(tmp_path / "run" / "model")).eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(run.model(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(384, 1536), (1536, 384)])
def test_int8_evaluation_is_bitsandbytes_own_a_block_at_a_time(monkeypatch, shape):
    """Evaluating an int8 layer on a CPU computes what bitsandbytes' forward does, also where a block of
    rows holds none of the batch's outlier columns (found over the whole input). Equal to float
    rounding: the float matmul of the outlier columns may round a last, shorter block by one ulp."""
    import bitsandbytes as bnb
    torch.manual_seed(0)
    plain = torch.nn.Linear(*shape)
    layer = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu").eval()
    x = torch.randn(3, 50, shape[0])
    x[1, 3, 7], x[2, 40, 11] = 9.0, -12.0  # outliers in two rows only
    monkeypatch.setattr(lora_fast, "_INT8_BLOCK_ELEMENTS", 8 * max(shape))  # blocks of 8 rows
    with torch.no_grad():
        assert lora_fast._frozen_int8_eval(layer, x)
        with_outliers = lora_fast._int8_inference(layer, x)
        torch.testing.assert_close(with_outliers, layer(x), rtol=1e-6, atol=1e-6)
        layer.state.threshold = 0.0  # no outlier columns at all
        torch.testing.assert_close(lora_fast._int8_inference(layer, x), layer(x), rtol=1e-6, atol=1e-6)
        # the tolerance is far below what quantizing the outlier columns to int8 changes
        assert (with_outliers - layer(x)).abs().max() > 1e-3
    assert not lora_fast._frozen_int8_eval(layer, x)  # gradients on: bitsandbytes' own forward


def test_int8_model_evaluates_as_with_peft(tiny_bert, monkeypatch):
    model = _peft_bert(tiny_bert, 0.1, "int8")
    model.eval()
    batch = _batch(n=4, length=9)
    monkeypatch.setattr(lora_fast, "_INT8_BLOCK_ELEMENTS", 64)
    calls, real = [], lora_fast._int8_inference
    monkeypatch.setattr(lora_fast, "_int8_inference", lambda base, x: calls.append(1) or real(base, x))
    with torch.no_grad():
        ref = model(**batch).logits
        lora_fast.install(model)
        fast = model(**batch).logits
    assert torch.equal(fast, ref) and len(calls) == len(lora_fast.lora_layers(model))
