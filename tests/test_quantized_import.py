"""bitsandbytes imported by a quantized `peftlab train` / `peftlab plan` process: its default
backend's kernels stay plain functions (no torch.compile, so no compiler work at first use), torch's
own ``torch.compile`` is restored, and a 4-bit and an 8-bit layer compute what their dequantized
weights give."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import torch
real = torch.compile
from peftlab.system import import_bitsandbytes_uncompiled
assert import_bitsandbytes_uncompiled() is True
assert torch.compile is real
assert import_bitsandbytes_uncompiled() is False  # already imported: nothing changes
import bitsandbytes as bnb
from bitsandbytes.backends.default import ops
for name in ("_dequantize_4bit_compute", "_dequantize_blockwise_compute"):
    wrapper = getattr(ops, name)
    inner = [c.cell_contents for c in wrapper.__closure__ if callable(c.cell_contents)]
    assert inner and all(f is wrapper.__wrapped__ for f in inner), name  # its compiled_fn is the plain function
torch.manual_seed(0)
x = torch.randn(5, 64)
nf4 = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
nf4.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4").to("cpu")
w = bnb.functional.dequantize_4bit(nf4.weight.data, nf4.weight.quant_state)
torch.testing.assert_close(nf4(x), x @ w.t(), rtol=1e-4, atol=1e-4)
int8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
int8.weight = bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False, has_fp16_weights=False).to("cpu")
w8 = int8.weight.CB.float() * int8.weight.SCB.float().unsqueeze(1) / 127
torch.testing.assert_close(int8(x), x @ w8.t(), rtol=0.02, atol=0.05)
print("ok")
"""


def test_bitsandbytes_imports_uncompiled_and_computes_the_same():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
