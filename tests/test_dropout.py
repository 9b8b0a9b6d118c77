"""peftlab's CPU dropout (peftlab/dropout.py): the masks' rate and determinism, the same output and
gradients as the plain expression under the same mask, identity in evaluation, and the model's
dropout layers routed through it by a training run (and not when the recipe turns it off)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import peftlab
from conftest import ner_recipe
from peftlab import dropout as fast_dropout

CPU = torch.device("cpu")


def test_keep_mask_rate_and_determinism():
    a = fast_dropout.keep_mask(torch.Size([400, 1000]), 0.1, 7, CPU)
    b = fast_dropout.keep_mask(torch.Size([400, 1000]), 0.1, 7, CPU)
    c = fast_dropout.keep_mask(torch.Size([400, 1000]), 0.1, 8, CPU)
    assert a.dtype == torch.uint8 and a.shape == (400, 1000) and set(a.unique().tolist()) == {0, 1}
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(1 - a.float().mean().item() - 0.1) < 0.003  # 400k draws: 3 sigma is 0.0014
    assert abs(fast_dropout.keep_mask(torch.Size([400, 1000]), 0.5, 9, CPU).float().mean().item() - 0.5) < 0.005
    assert fast_dropout.keep_mask(torch.Size([1000]), 0.0, 7, CPU).all()


def test_masked_is_bitwise_the_masked_fill_expression():
    """masked() multiplies by the byte mask a chunk at a time; its bits equal those of scaling and
    then zero-filling (+0.0, not -0.0, where dropped), with and without a gain, into pooled memory,
    in place, and from a non-contiguous input."""
    x = torch.randn(600, 257)  # more elements than one chunk, and a partial last chunk
    assert x.numel() > fast_dropout._CPU_CHUNK_ELEMENTS
    keep = fast_dropout.keep_mask(x.shape, 0.3, 3, CPU)

    def bits(t):
        return t.contiguous().view(torch.int32)

    for gain in (1.0, 1 / 0.7):
        ref = (x * gain).masked_fill_(keep == 0, 0.0)
        assert torch.equal(bits(fast_dropout.masked(x, keep, gain)), bits(ref))
        inplace = x.clone()
        assert fast_dropout.masked(inplace, keep, gain, out=inplace) is inplace
        assert torch.equal(bits(inplace), bits(ref))
        strided = x.t().contiguous().t()  # same values, transposed layout
        assert torch.equal(bits(fast_dropout.masked(strided, keep, gain)), bits(ref))


def test_packed_mask_applies_as_the_byte_mask():
    """A mask kept as bits for backward masks to the same bits as the byte mask, across chunks and
    for lengths that are not a multiple of 8; 8 elements or fewer stay bytes."""
    for n in (5, 8, 9, 1000, 3 * fast_dropout._CPU_CHUNK_ELEMENTS + 13):
        x = torch.randn(n)
        keep = fast_dropout.keep_mask(x.shape, 0.3, n, CPU)
        bits = fast_dropout.packed(keep)
        assert bits.numel() == (n if n <= 8 else (n + 7) // 8)
        expected = fast_dropout.masked(x, keep, 1.5).view(torch.int32)
        assert torch.equal(fast_dropout.masked(x, bits, 1.5).view(torch.int32), expected)


class _Recorder:
    """Wraps keep_mask and keeps every mask it drew, in order."""

    def __init__(self, monkeypatch):
        self.masks: list[torch.Tensor] = []
        real = fast_dropout.keep_mask

        def recording(shape, p, seed, device):
            mask = real(shape, p, seed, device)
            self.masks.append(mask)
            return mask

        monkeypatch.setattr(fast_dropout, "keep_mask", recording)


def test_same_output_and_gradient_as_the_plain_expression(monkeypatch):
    recorder = _Recorder(monkeypatch)
    x = torch.randn(6, 50, requires_grad=True)
    weight = torch.randn(50)
    out = fast_dropout.dropout(x, 0.3)
    (out * weight).sum().backward()
    (mask,) = recorder.masks
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x * mask / 0.7
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert 0 < int(mask.sum()) < mask.numel()  # some kept, some dropped


def test_identity_in_evaluation_and_at_zero():
    x = torch.randn(4, 8)
    assert fast_dropout.dropout(x, 0.3, training=False) is x
    assert fast_dropout.dropout(x, 0.0) is x
    assert torch.equal(fast_dropout.dropout(x, 1.0), torch.zeros_like(x))


def _tiny_token_model(tiny_bert):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(str(tiny_bert), num_labels=5)
    for name, m in model.named_modules():  # attention dropout runs inside sdpa, not through the layer
        if name.endswith("attention.self.dropout"):
            m.p = 0.0
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 3000, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 5, (3, 9), generator=g)}


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_under_the_same_masks_as_torch_expression(tiny_bert, monkeypatch):
    """A BERT's training step with its dropout layers routed through peftlab's dropout gives the
    logits and gradients of the same model whose dropout multiplies by those masks in plain torch."""
    model = _tiny_token_model(tiny_bert)
    model.train()
    batch = _batch()
    recorder = _Recorder(monkeypatch)
    assert fast_dropout.install(model) == 8  # embeddings, 2 layers x 3, classifier
    logits, grads = _logits_and_grads(model, batch)
    fast_dropout.uninstall(model)
    masks = iter(recorder.masks)

    def replay(self, x):
        return x if self.p == 0 else x * next(masks) / (1 - self.p)

    for m in model.modules():
        if type(m) is torch.nn.Dropout:
            monkeypatch.setattr(m, "forward", replay.__get__(m))
    ref_logits, ref_grads = _logits_and_grads(model, batch)
    assert len(recorder.masks) == 6  # embeddings, 2 layers x (attention output, ffn output), classifier
    torch.testing.assert_close(logits, ref_logits)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_logits_unchanged_and_seed_fixes_training(tiny_bert):
    model = _tiny_token_model(tiny_bert)
    batch = _batch()
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
        fast_dropout.install(model)
        assert torch.equal(model(**batch).logits, plain)
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        with torch.no_grad():
            losses.append(model(**batch).loss)
    assert torch.equal(losses[0], losses[1])
    with torch.no_grad():
        assert not torch.equal(model(**batch).loss, losses[0])  # the next masks differ


@pytest.mark.parametrize("enabled", [True, False])
def test_training_run_routes_the_model_dropout(tiny_bert, wnut_small, tmp_path, enabled):
    recipe = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 4}, epochs=1)
    recipe["train"]["cpu_fast_dropout"] = enabled
    peftlab.train(recipe)
    # the model's 8 and peft's 12 LoRA dropouts (which peft's own forward would call)
    logged = "dropout: 20 layers draw integer-bit masks (train.cpu_fast_dropout)" in (tmp_path / "run" / "train.log").read_text()
    assert logged is enabled


def test_mask_drawn_in_chunks_is_the_one_draw_stream():
    """keep_mask draws a CPU mask a chunk at a time: the same mask as one draw of all its words."""
    shape = torch.Size([3, 100_003])  # 75k words: more than one chunk, and a partial last word
    n = shape.numel()
    words = np.random.PCG64(11).random_raw((n + 3) // 4)  # one draw of every word
    expected = torch.from_numpy(words.view(np.int16)[:n] >= round(0.1 * 65536) - 32768).view(shape).to(torch.uint8)
    assert (n + 3) // 4 > fast_dropout._CPU_CHUNK_WORDS
    assert torch.equal(fast_dropout.keep_mask(shape, 0.1, 11, CPU), expected)
