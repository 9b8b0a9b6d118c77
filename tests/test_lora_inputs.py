"""What peftlab's LoRA path keeps of a layer's input (methods/lora_inputs.py): an input made by a
GELU, a LayerNorm or a product is computed again in backward, bit for bit, from what autograd keeps
anyway; the step's logits and gradients are the same bits with and without that, and the graph
keeps less."""

from __future__ import annotations

import pytest
import torch

from peftlab.methods import lora_fast, lora_inputs
from test_lora_fast import _batch, _peft_bert

CPU = torch.device("cpu")


def _bits_equal(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_recompute_for_each_kind_of_producer():
    x = torch.randn(5, 8, requires_grad=True)
    y = torch.randn(5, 8, requires_grad=True)
    norm = torch.nn.LayerNorm(8, eps=1e-7)
    eps = lora_inputs.layer_norm_eps(torch.nn.Sequential(norm))
    for made in (torch.nn.functional.gelu(x), torch.nn.functional.gelu(x, approximate="tanh"),
                 torch.nn.functional.silu(x) * y, norm(x)):
        again = lora_inputs.recompute_for(made, eps)
        assert again is not None, made.grad_fn
        assert _bits_equal(lora_inputs.compute_again(again, None), made)


def test_no_recompute_where_the_makings_are_not_kept():
    x = torch.randn(5, 8, requires_grad=True)
    frozen = torch.randn(8)
    norm = torch.nn.LayerNorm(8)
    assert lora_inputs.recompute_for(x, {}) is None  # a leaf
    assert lora_inputs.recompute_for(frozen * x, {}) is None  # the product keeps only the frozen factor
    assert lora_inputs.recompute_for(norm(x), {}) is None  # a LayerNorm whose eps is not known
    assert lora_inputs.recompute_for(torch.nn.functional.gelu(x).view(40), {}) is None  # a view
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # e.g. checkpointing
        assert lora_inputs.recompute_for(torch.nn.functional.gelu(x), {}) is None


def _step(tiny_bert, recompute: bool, p: float):
    model = _peft_bert(tiny_bert, p)
    model.train()
    lora_fast.install(model, recompute=recompute)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same masks in both runs
    out = model(**_batch(n=4, length=9))
    saved = _saved_bytes(out.loss.grad_fn)
    out.loss.backward()
    grads = {n: q.grad for n, q in model.named_parameters() if q.requires_grad}
    return out.logits.detach(), grads, saved


def _saved_bytes(root) -> int:
    """Bytes of the distinct storages the autograd graph under ``root`` keeps for backward."""
    storages: dict[int, int] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        values += list(getattr(node, "saved_tensors", ()))
        for t in values:
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_same_bits_and_less_kept_with_recompute(tiny_bert, p):
    logits, grads, saved = _step(tiny_bert, True, p)
    ref_logits, ref_grads, ref_saved = _step(tiny_bert, False, p)
    assert _bits_equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert _bits_equal(grads[name], ref_grads[name]), name
    # every adapted input is a LayerNorm's, a GELU's or the attention's output; all but the last
    # (the attention output, 2 layers x 36 tokens x hidden) are no longer kept
    hidden = 4 * 9 * 4 * 32  # at least one LayerNorm-output copy per layer: 4 x 9 tokens, float32, 32 wide
    assert saved <= ref_saved - 2 * 2 * hidden, (saved, ref_saved)


def test_nothing_of_a_step_stays_referenced_after_its_backward(tiny_bert):
    """The recomputed copy is shared by the layers that read one input and let go by the last of
    them: after a step's backward no recompute holds a tensor, so nothing of the step outlives it."""
    import weakref

    model = _peft_bert(tiny_bert, 0.3)
    model.train()
    lora_fast.install(model)
    seen = []
    real = lora_inputs.recompute_for

    def recording(x, eps):
        again = real(x, eps)
        if again is not None:
            seen.append(again)
        return again

    lora_inputs.recompute_for = recording
    try:
        model(**_batch()).loss.backward()
    finally:
        lora_inputs.recompute_for = real
    assert len(seen) == 5  # each layer: LayerNorm -> intermediate, GELU -> output; layer 1 also LayerNorm -> q/k/v
    assert [a.users for a in seen] == [0] * 5 and all(a.tensors == () and a._copy is None for a in seen)
    shared = weakref.ref(lora_fast.lora_layers(model)[0]._peftlab_dropout)
    del model
    import gc

    gc.collect()
    assert shared() is None


@pytest.mark.parametrize("recompute", [True, False])
def test_the_method_option_reaches_the_path(tiny_bert, recompute):
    from peftlab.methods.lora import Lora, LoraOptions

    model = _peft_bert(tiny_bert, 0.1)
    Lora(LoraOptions(recompute_inputs=recompute))._install_fast_path(model)
    assert {layer._peftlab_dropout.recompute for layer in lora_fast.lora_layers(model)} == {recompute}


def _llama_step(path, recompute: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(path)), cfg)
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.normal_(0, 0.5)
    model.train()
    lora_fast.install(model, recompute=recompute)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    out = model(input_ids=ids, labels=ids)
    saved = _saved_bytes(out.loss.grad_fn)
    out.loss.backward()
    return out.logits.detach(), {n: q.grad for n, q in model.named_parameters() if q.requires_grad}, saved


def test_llama_mlp_input_recomputed_from_its_factors(tiny_llama):
    """On a Llama the down projection reads act(gate) * up, whose factors autograd keeps: the same
    bits, and one 64-wide copy per layer less kept (2 layers x 22 tokens, float32)."""
    logits, grads, saved = _llama_step(tiny_llama, True)
    ref_logits, ref_grads, ref_saved = _llama_step(tiny_llama, False)
    assert _bits_equal(logits, ref_logits)
    assert all(_bits_equal(grads[n], ref_grads[n]) for n in ref_grads)
    assert saved <= ref_saved - 2 * 22 * 64 * 4, (saved, ref_saved)
