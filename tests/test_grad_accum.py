"""The loss is the mean over every target token of the optimizer step: one batch of 8 sentences,
the same 8 as 4 accumulated micro-batches of 2, and as 2 processes x 2 accumulated micro-batches of
2 give the same gradients (WNUT sentences differ in length, so a per-micro-batch mean would not)."""

from __future__ import annotations

import os

import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, ner_recipe, run_cli
from test_ddp import launch

SHIM = ROOT / "tests" / "fault_shim"


def grads_of(tmp_path, backbone, files, name, batch_size, grad_accum, processes=1):
    recipe = ner_recipe(backbone, files, tmp_path / name, {"name": "full"}, batch_size=batch_size,
                        grad_accum=grad_accum, group_by_length=False, max_grad_norm=None, num_threads=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    dump = tmp_path / f"{name}-grads"
    env = {"PEFTLAB_TEST_FAULT": f"dump_grads:{dump}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")]))}
    if processes == 1:
        res = run_cli("train", str(path), env=env, timeout=300)
    else:
        res = launch(path, {**env, "ACCELERATE_USE_CPU": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [load_file(f"{dump}.rank{r}.safetensors") for r in range(processes)]
    for other in ranks[1:]:  # DDP: every process holds the all-reduced gradient
        assert all((other[k] - ranks[0][k]).abs().max() < 1e-6 for k in ranks[0])
    return ranks[0]


def test_accumulation_and_processes_weigh_every_token_alike(tmp_path, tiny_bert_no_dropout, wnut_small):
    one = grads_of(tmp_path, tiny_bert_no_dropout, wnut_small, "one-batch", 8, 1)
    accum = grads_of(tmp_path, tiny_bert_no_dropout, wnut_small, "accum4", 2, 4)
    ddp = grads_of(tmp_path, tiny_bert_no_dropout, wnut_small, "ddp2-accum2", 2, 2, processes=2)
    assert set(one) == set(accum) == set(ddp) and len(one) > 10
    top = max(float(g.abs().max()) for g in one.values())
    for name, g in one.items():  # float32 sums in another order: equal to ~1e-6 of the largest gradient
        for other in (accum, ddp):
            torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6 * top, msg=name)
