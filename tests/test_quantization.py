"""Quantized backbones (bitsandbytes int8 / nf4 / fp4 on this CPU): what is stored quantized, what stays
full precision, compute dtype, parameter counts, and LoRA / DoRA training + save -> load through peftlab."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import bitsandbytes as bnb  # a dependency: were it missing, this module fails (never skips)
import pytest
import torch

import peftlab
from conftest import cls_recipe, minilm_path, ner_recipe, rescore_test
from peftlab.backbones import compute_dtype, load_model, unquantized_modules
from peftlab.recipe import BackboneConfig
from peftlab.runs import _numel, load_run

TOKEN = "AutoModelForTokenClassification"
SEQ = "AutoModelForSequenceClassification"
KW = {"num_labels": 5}


def linears(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def assert_quantized(model, quantization: str, full_precision: set[str]) -> None:
    """Every linear layer but ``full_precision`` is a bitsandbytes layer storing packed weights."""
    mods = linears(model)
    assert full_precision <= set(mods), (full_precision, set(mods))
    quantized = {n: m for n, m in mods.items() if n not in full_precision}
    assert len(quantized) >= 12  # 2 layers x 6 linears (tiny BERT) at least
    for name, m in quantized.items():
        w = m.weight
        if quantization == "int8":
            assert isinstance(m, bnb.nn.Linear8bitLt), name
            assert isinstance(w, bnb.nn.Int8Params) and w.dtype == torch.int8, name
            assert w.shape == (m.out_features, m.in_features)
        else:
            assert isinstance(m, bnb.nn.Linear4bit), name
            assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8, name
            qs = w.quant_state
            assert qs.quant_type == quantization and qs.nested  # double quantization on by default
            assert tuple(qs.shape) == (m.out_features, m.in_features)
            assert w.numel() * 2 == m.out_features * m.in_features  # two 4-bit values per byte
            assert _numel(w) == m.out_features * m.in_features  # counted at its unpacked size
    for name in full_precision:
        m = mods[name]
        assert type(m) is torch.nn.Linear, name
        assert type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32, name


@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp4"])
def test_linear_weights_quantized_head_full_precision(tiny_bert, quantization):
    cfg = BackboneConfig(name=str(tiny_bert), quantization=quantization)
    model = load_model(cfg, TOKEN, KW)
    assert_quantized(model, quantization, {"classifier"})
    plain = load_model(BackboneConfig(name=str(tiny_bert)), TOKEN, KW)
    assert sum(_numel(p) for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]])}
    with torch.no_grad():
        q, f = model(**batch).logits, plain(**batch).logits
    assert q.shape == f.shape == (1, 4, 5) and torch.isfinite(q).all()


def test_quant_storage_stores_the_packed_4bit_weights_in_a_float_dtype(tiny_bert):
    """backbone.quant_storage (for FSDP, which shards float tensors only): the same 4-bit layers and
    the same outputs, the packed bytes held as float32 instead of uint8."""
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]])}
    models = {}
    for storage in ("uint8", "float32"):
        torch.manual_seed(0)  # the same fresh task head
        models[storage] = load_model(BackboneConfig(name=str(tiny_bert), quantization="nf4", quant_storage=storage),
                                     TOKEN, KW)
    stored = {s: {p.dtype for n, p in m.named_parameters() if "attention.self.query.weight" in n}
              for s, m in models.items()}
    assert stored == {"uint8": {torch.uint8}, "float32": {torch.float32}}
    with torch.no_grad():
        a, b = (m(**batch).logits for m in models.values())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_4bit_eval_keeps_the_training_layout(tiny_bert, quantization):
    """An eval forward without gradients computes what the gradient path computes and leaves the 4-bit
    weights as they were, so training can follow an evaluation. (On CPUs with AVX512-BF16, bitsandbytes
    would otherwise repack them into a bf16 inference format on the first such forward: this test then
    failed here on the tiny model's 32-wide layers, and training after evaluation failed on MiniLM.)"""
    model = load_model(BackboneConfig(name=str(tiny_bert), quantization=quantization), TOKEN, KW)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [(m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in layers]
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]])}
    model.eval()
    with torch.no_grad():
        fast = model(**batch).logits
    logits = model(**batch).logits  # the embeddings require grad: every 4-bit layer takes the autograd path
    torch.testing.assert_close(fast, logits.detach(), rtol=1e-5, atol=1e-6)
    for m, (w, absmax) in zip(layers, before):
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data, w) and torch.equal(m.weight.quant_state.absmax, absmax)
    model.train()
    model(**batch).logits.sum().backward()
    assert model.classifier.weight.grad is not None


def test_sequence_classification_pooler_quantized_when_in_checkpoint(tiny_bert):
    model = load_model(BackboneConfig(name=str(tiny_bert), quantization="nf4"), SEQ, KW)
    assert_quantized(model, "nf4", {"classifier"})
    assert isinstance(model.bert.pooler.dense, bnb.nn.Linear4bit)


@pytest.fixture(scope="module")
def bert_without_pooler(tmp_path_factory, tiny_bert) -> Path:
    """A checkpoint saved without BERT's pooler: a sequence classifier must initialise it."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("bert-no-pooler")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_layers_missing_from_checkpoint_stay_full_precision(bert_without_pooler, quantization):
    """bitsandbytes cannot initialise a quantized layer that has no weights (transformers 5 crashes):
    the freshly initialised pooler and head are kept in float32, everything else is quantized."""
    cfg = BackboneConfig(name=str(bert_without_pooler), quantization=quantization)
    skip = unquantized_modules(cfg, SEQ, KW, str(bert_without_pooler))
    assert "bert.pooler.dense" in skip and "classifier" in skip
    model = load_model(cfg, SEQ, KW)
    assert_quantized(model, quantization, {"classifier", "bert.pooler.dense"})
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[101, 7592, 102]])).logits).all()
    # a token classifier has no pooler: only its head is skipped
    assert "bert.pooler.dense" not in unquantized_modules(cfg, TOKEN, KW, str(bert_without_pooler))


def test_compute_dtype_auto(monkeypatch):
    auto = BackboneConfig(name="x", quantization="nf4")
    assert compute_dtype(auto, torch.device("cpu")) == torch.float32
    assert compute_dtype(auto.model_copy(update={"compute_dtype": "bfloat16"}), torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype(auto, torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype(auto, torch.device("cpu")) == torch.float32  # a CPU run on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute_dtype(auto, torch.device("cuda", 0)) == torch.float16  # pre-Ampere GPUs


def test_quantized_model_goes_to_accelerate_device(tiny_bert):
    from accelerate import PartialState

    model = load_model(BackboneConfig(name=str(tiny_bert), quantization="nf4"), TOKEN, KW)
    device = PartialState().device
    # the whole model (quantized linears, float32 head) on this process's device
    assert {p.device for p in model.parameters()} == {device}
    assert {b.device for b in model.buffers()} <= {device}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def plain_lora_params(tiny_bert, wnut_small, tmp_path_factory) -> dict:
    """params.json of the same LoRA on the unquantized backbone (the counts must not change)."""
    out = tmp_path_factory.mktemp("q") / "plain"
    peftlab.train(ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4, "alpha": 8}, max_steps=1))
    return read(out / "params.json")


@pytest.mark.parametrize("quantization, method", [
    ("int8", {"name": "lora", "r": 4, "alpha": 8}),
    ("nf4", {"name": "lora", "r": 4, "alpha": 8}),
    ("nf4", {"name": "lora", "r": 4, "alpha": 8, "use_dora": True}),
])
def test_quantized_lora_trains_and_reloads_identically(tiny_bert, wnut_small, tmp_path, plain_lora_params,
                                                        quantization, method):
    out = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, out, method, epochs=3, lr=1e-2, log_every=2)
    recipe["backbone"]["quantization"] = quantization
    metrics = peftlab.train(recipe)
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < losses[0] * 0.7, losses
    params = read(out / "params.json")
    for key in ("backbone_params", "head_params", "total_params", "trainable_head_params"):
        assert params[key] == plain_lora_params[key], key
    if not method.get("use_dora"):
        assert params["trainable_params_without_head"] == plain_lora_params["trainable_params_without_head"]
    saved = read(out / "model" / "peftlab_method.json")
    assert saved["backbone"]["quantization"] == quantization

    run = load_run(out)
    base = run.model.get_base_model()
    assert_quantized_lora(base, quantization)
    batch = run.tokenizer([["Paris", "is", "in", "France"], ["I", "love", "new", "york"]],
                          is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = run.model(**batch).logits
        b = load_run(out).model(**batch).logits
    assert torch.equal(a, b)
    # the best model that was tested is the one that was saved: same test F1 from the reloaded run
    again = rescore_test(run)
    assert again["f1"] == pytest.approx(metrics["test"]["f1"], abs=1e-9)
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-9)


def assert_quantized_lora(model, quantization: str) -> None:
    """Inside the peft wrapper: base layers quantized, LoRA factors and the head in float32."""
    layer_cls = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    bases = [m for n, m in model.named_modules() if n.endswith("base_layer")]
    assert len(bases) == 12 and all(isinstance(m, layer_cls) for m in bases)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    assert head and all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in head)


@pytest.mark.integration
def test_qlora_on_real_minilm_intents(banking_small, tmp_path):
    """nf4 MiniLM: 36 linear layers quantized (pooler included), head float32; LoRA loss falls; reload equal."""
    out = tmp_path / "qlora"
    recipe = cls_recipe(minilm_path(), banking_small, out, {"name": "lora", "r": 8, "alpha": 16},
                        max_steps=24, lr=5e-3, log_every=4, batch_size=16)
    recipe["backbone"]["quantization"] = "nf4"
    recipe["data"]["max_length"] = 32
    metrics = peftlab.train(recipe)
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < losses[0], losses
    run = load_run(out)
    base = run.model.get_base_model()
    bases = [m for n, m in base.named_modules() if n.endswith("base_layer")]
    assert len(bases) == 6 * 6 + 1 and all(isinstance(m, bnb.nn.Linear4bit) for m in bases)  # + pooler
    assert type(base.classifier.original_module) is torch.nn.Linear
    params = read(out / "params.json")
    assert params["backbone_params"] == 22_713_216  # all-MiniLM-L6-v2 incl. pooler, unpacked
    batch = run.tokenizer(["my card has not arrived yet", "what is the exchange rate"], padding=True,
                          return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(run.model(**batch).logits, load_run(out).model(**batch).logits)


def _resident_in(folder: Path) -> tuple[int, list[tuple[int, int]]]:
    """(resident bytes, address ranges) of this process's memory mappings of files in ``folder``."""
    rss, spans, inside = 0, [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            inside = len(parts) >= 6 and parts[5].startswith(str(folder))
            if inside:
                spans.append(tuple(int(x, 16) for x in parts[0].split("-")))
        elif inside and parts[0] == "Rss:":
            rss += int(parts[1]) * 1024
    return rss, spans


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_load_drops_the_checkpoint_pages_it_read(tiny_llama, quantization, monkeypatch):
    """Quantizing reads every float weight of the memory-mapped checkpoint; the load then drops those
    pages from resident memory. The weights left unquantized still point into the file (as a float
    load's do), ties stay tied, and the model computes the same."""
    import peftlab.backbones as backbones

    cfg = BackboneConfig(name=str(tiny_llama), quantization=quantization)
    ids = torch.tensor([[5, 17, 42, 99, 3]])

    def load(release: bool):
        if not release:
            monkeypatch.setattr(backbones, "drop_checkpoint_pages", lambda model: 0)
        model = load_model(cfg, "AutoModelForCausalLM", device=torch.device("cpu"))
        monkeypatch.undo()
        resident, spans = _resident_in(tiny_llama)
        floats = [t for t in [*model.parameters(), *model.buffers()] if type(t) is not bnb.nn.Int8Params
                  and type(t) is not bnb.nn.Params4bit and t.is_floating_point()]
        in_file = [t for t in floats if any(lo <= t.data_ptr() < hi for lo, hi in spans)]
        with torch.no_grad():
            return model, resident, in_file, model(input_ids=ids).logits

    plain, resident, in_file, before = load(release=False)
    assert in_file and resident > 0  # the unquantized weights point into the file, its pages resident
    del plain, in_file  # its mapping closes
    gc.collect()
    model, resident, in_file, after = load(release=True)
    assert in_file and resident == 0
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(before, after)
    assert _resident_in(tiny_llama)[0] > 0  # the forward read the pages it needed back


def test_only_unwritten_file_pages_are_dropped(tmp_path):
    """A mapping with a page written in memory keeps its pages (dropping them would undo the write);
    an unwritten one has its pages dropped and reads back the file's bytes."""
    from peftlab.system import drop_clean_file_pages

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    clean = torch.from_file(str(path), shared=False, size=2**20, dtype=torch.uint8)
    written = torch.from_file(str(path), shared=False, size=2**20, dtype=torch.uint8)
    assert int(clean.sum()) == int(written.sum())  # both read in: resident
    written[0] = 7
    assert _resident_in(tmp_path)[0] >= 2 * 2**20
    dropped = drop_clean_file_pages([clean.data_ptr(), written.data_ptr()])
    assert dropped == 2**20
    assert int(written[0]) == 7 and int(clean[0]) == 0
    assert torch.equal(clean, torch.tensor(list(range(256)) * 4096, dtype=torch.uint8))
