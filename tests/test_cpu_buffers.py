"""peftlab's reused CPU buffers (peftlab/cpu_buffers.py): memory comes back only when no tensor uses
it, pages past a smaller request go back to the OS, and a training step computes the same values."""

from __future__ import annotations

import gc
import mmap

import numpy as np
import torch

from peftlab import cpu_buffers


def test_memory_is_reused_only_after_every_user_is_gone():
    cpu_buffers.release()
    a = cpu_buffers.empty((64, 32), torch.float32)
    a.fill_(1.0)
    ptr = a.data_ptr()
    view = a[3:]
    del a
    b = cpu_buffers.empty((64, 32), torch.float32)  # a's memory is still used by its view
    assert b.data_ptr() != ptr
    del view
    c = cpu_buffers.empty((16, 8), torch.int64)
    assert c.data_ptr() == ptr and c.shape == (16, 8) and c.dtype == torch.int64
    b.fill_(2.0)
    c.fill_(-1)
    assert bool((b == 2.0).all())  # c's writes do not reach b
    cpu_buffers.release()


def test_a_tensor_saved_for_backward_keeps_its_memory():
    cpu_buffers.release()
    x = torch.randn(10, 10, requires_grad=True)
    saved = cpu_buffers.empty((10, 10), torch.float32).copy_(torch.randn(10, 10))
    expected = saved.clone()
    loss = (x * saved).sum()
    ptr = saved.data_ptr()
    del saved
    other = cpu_buffers.empty((10, 10), torch.float32)
    assert other.data_ptr() != ptr
    other.fill_(7.0)
    loss.backward()
    assert torch.equal(x.grad, expected)
    del loss
    assert cpu_buffers.empty((10, 10), torch.float32).data_ptr() == ptr  # free once the graph is gone
    cpu_buffers.release()


def test_pages_past_a_smaller_request_go_back_to_the_os():
    gc.collect()  # models of earlier tests (reference cycles) may still hold pooled tensors
    cpu_buffers.release()
    big = cpu_buffers.empty((8 << 20,), torch.uint8)
    big.fill_(7)
    del big
    small = cpu_buffers.empty((1 << 20,), torch.uint8)
    (slot,) = cpu_buffers._slots
    tail = slot.array[(2 << 20):]  # the whole pages past the request were discarded: they read as zeros
    assert int(small[0]) == 7 and int(np.count_nonzero(tail)) < mmap.PAGESIZE  # (a partial last page stays)
    assert cpu_buffers.pooled_bytes() == 8 << 20
    del small, tail
    assert cpu_buffers.release() == 8 << 20 and cpu_buffers.pooled_bytes() == 0


def test_other_devices_and_empty_shapes_get_plain_tensors():
    t = cpu_buffers.empty((4, 5), torch.float16, "meta")
    assert t.device.type == "meta" and t.shape == (4, 5)
    cpu_buffers.release()
    assert cpu_buffers.empty((0, 3), torch.float32).shape == (0, 3)
    assert cpu_buffers.pooled_bytes() == 0  # neither took pooled memory


def test_lora_step_same_values_with_and_without_the_pool(tiny_bert, monkeypatch):
    """peftlab's LoRA path and the model's dropout, in pooled memory or in fresh tensors: the same
    logits and gradients to the last bit (same masks: the seed is fixed)."""
    from peftlab import dropout as fast_dropout
    from peftlab.methods import lora_fast
    from test_lora_fast import _batch, _peft_bert

    model = _peft_bert(tiny_bert, dropout=0.2)
    lora_fast.install(model)
    fast_dropout.install(model)
    model.train()

    def step():
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        out = model(**_batch())
        out.loss.backward()
        return out.logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    pooled = step()
    assert cpu_buffers.pooled_bytes() > 0
    monkeypatch.setattr(cpu_buffers, "empty", lambda shape, dtype, device="cpu": torch.empty(shape, dtype=dtype, device=device))
    plain = step()
    assert torch.equal(pooled[0], plain[0])
    assert pooled[1].keys() == plain[1].keys() and any("lora_A" in n for n in plain[1])
    for name in plain[1]:
        assert torch.equal(pooled[1][name], plain[1][name]), name


def test_threads_never_share_a_buffer():
    """Threads serving different adapters take buffers at once: none gets a buffer another holds."""
    import sys
    import threading
    import time

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the pool too
    shared: list[int] = []

    def worker(k: int) -> None:
        for _ in range(2500):
            t = cpu_buffers.empty((16,), torch.float32)
            t.fill_(float(k))
            time.sleep(0)
            if not bool((t == k).all()):
                shared.append(k)
            del t

    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
        cpu_buffers.release()
    assert shared == []
