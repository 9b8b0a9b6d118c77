"""The planner (`peftlab plan`, `train.batch_size: auto`): each component against a measured tiny model,
the depth extrapolation against a deeper model, fitting a budget, and its one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.api import as_recipe
from peftlab.planner.estimate import Estimator
from peftlab.planner.trace import DepthTrace, Trace, trace_depth

from conftest import cls_recipe, ner_recipe, run_cli


def stored_bytes(model) -> int:
    """Bytes of every parameter and buffer storage of a loaded model, with bitsandbytes' constants."""
    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for module in model.modules():
        for p in list(module._parameters.values()) + list(module._buffers.values()):
            if p is None:
                continue
            add(p)
            state = getattr(p, "quant_state", None)
            if state is not None:
                add(state.absmax)
                if state.nested:
                    add(state.state2.absmax)
                    total += 4  # the nested offset (a 0-d float32)
            if getattr(p, "SCB", None) is not None:
                add(p.SCB)
    return total


@pytest.mark.parametrize("method,quantization", [({"name": "full"}, "none"), ({"name": "lora", "r": 4}, "none"),
                                                 ({"name": "lora", "r": 4}, "nf4"), ({"name": "lora", "r": 4}, "int8"),
                                                 ({"name": "prefix", "num_virtual_tokens": 4, "init": "vocab"}, "none")])
def test_weight_bytes_equal_the_loaded_model(tiny_bert, wnut_small, tmp_path, method, quantization):
    from peftlab.runs import build_model

    raw = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", method)
    raw["backbone"]["quantization"] = quantization
    recipe = as_recipe(raw)
    estimator = Estimator(recipe, "cpu")
    built = build_model(recipe, estimator.data.task, estimator.data.tokenizer)
    w = estimator.weights
    trainable = built.method.trainable_parameters(built.model)
    assert w.trainable_params == sum(p.numel() for p in trainable.values())
    assert w.frozen_bytes + w.trainable_bytes == stored_bytes(built.model)
    if quantization != "none":
        assert w.quantized_params > 0


def test_gradients_and_optimizer_state_equal_a_real_step(tiny_bert, wnut_small, tmp_path):
    recipe = as_recipe(ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 4}))
    plan = peftlab.api.plan(recipe, device="cpu")
    parts = {c.name: c.bytes for c in plan.components}
    from peftlab.runs import build_model
    from peftlab.training.optim import make_optimizer

    estimator = Estimator(recipe, "cpu")
    built = build_model(recipe, estimator.data.task, estimator.data.tokenizer)
    trainable = built.method.trainable_parameters(built.model)
    optimizer = make_optimizer(built.model, trainable, recipe, built.ctx.head_names)
    batch = {k: v for k, v in estimator.data.task.collator(estimator.data.tokenizer)(
        [estimator.data.train[i] for i in range(4)]).items()}
    estimator.data.task.training_loss(built.model, batch).backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in trainable.values())
    optimizer.step()
    state = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert parts["gradients"] == grads
    assert parts["optimizer state"] == state


def _deeper(tiny_bert: Path, tmp_path: Path, layers: int, **changes) -> Path:
    """tiny_bert's architecture with ``layers`` layers and ``changes`` (random weights, same tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig.from_pretrained(tiny_bert, num_hidden_layers=layers, **changes)
    out = tmp_path / f"bert-{layers}"
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}, {"name": "adapter"}])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_shallow_depths_predict_a_deeper_model(tiny_bert, wnut_small, tmp_path, method, checkpointing):
    """Tensor memory of every phase at 5 layers, extrapolated from 1 and 2, equals the 5-layer model's own."""
    deep = _deeper(tiny_bert, tmp_path, 5)
    recipe = as_recipe(ner_recipe(deep, wnut_small, tmp_path / "run", method, gradient_checkpointing=checkpointing))
    estimator = Estimator(recipe, "cpu")
    assert estimator.layers == 5
    predicted = estimator.trace_for(16, checkpointing, 32)
    inputs = estimator.trace_inputs(16, checkpointing, 32)
    measured = trace_depth(inputs, 5, timed_steps=1)
    for phase in ("train", "step", "eval"):
        assert predicted.peak(phase) == pytest.approx(measured.peaks[phase], rel=0.03), phase


def test_the_step_time_comes_from_a_copy_up_to_four_layers_deeper(tiny_bert, wnut_small, tmp_path):
    """One layer's time is the difference of two timed copies: 2 and up to 6 layers (the backbone's
    own depth at most), not 2 and 3, whose small difference a noisy step multiplies by the depth."""
    deep = _deeper(tiny_bert, tmp_path, 5)
    estimator = Estimator(as_recipe(ner_recipe(deep, wnut_small, tmp_path / "run", {"name": "lora", "r": 4})), "cpu")
    t = estimator.trace_for(16, False, 32)
    assert (t.one.layers, t.two.layers, t.timed.layers) == (2, 3, 5)
    assert math.isnan(t.two.step_s) and t.one.step_s > 0 and t.timed.step_s > 0  # untimed, timed, timed
    assert t.step_s == pytest.approx(t.timed.step_s)  # the backbone's own depth was timed
    one, two, six = DepthTrace(2, {}, 1.0), DepthTrace(3, {}, math.nan), DepthTrace(6, {}, 2.0)
    assert Trace(30, one, two, six).step_s == pytest.approx(1.0 + 28 * 0.25)


def test_the_peak_that_moves_from_the_end_to_the_start_of_the_backward_is_extrapolated(tiny_bert, wnut_small, tmp_path):
    """Embedding gradients (a vocabulary twice the tokenizer's) outweigh a few layers' activations: at 2
    and 3 layers a step peaks at the end of its backward, at 12 at the start. The prediction follows
    the 12-layer model's own."""
    deep = _deeper(tiny_bert, tmp_path, 12, hidden_size=128, intermediate_size=128, vocab_size=2 * 30522)
    recipe = as_recipe(ner_recipe(deep, wnut_small, tmp_path / "run", {"name": "full"}))
    estimator = Estimator(recipe, "cpu")
    predicted = estimator.trace_for(16, False, 32, timed=False)
    measured = trace_depth(estimator.trace_inputs(16, False, 32), 12, timed_steps=0)
    end_only = predicted.extrapolate(predicted.one.peaks["train"], predicted.two.peaks["train"])
    assert end_only < 0.8 * measured.peaks["train"]  # the shallow depths' own peaks miss it
    assert predicted.peak("train") == pytest.approx(measured.peaks["train"], rel=0.03)


def test_a_one_epoch_run_trains_its_longest_batch_before_any_optimizer_state(tiny_bert, wnut_small, tmp_path):
    """The batches the planner expects are the run's own: the first holds the longest example, the
    largest of the others is the one trained with AdamW's state. Over two epochs the longest batch
    comes again with the state, and the plan says more."""
    from peftlab.training.launch import make_loaders

    def estimator(epochs: int) -> Estimator:
        return Estimator(as_recipe(ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "full"}, epochs=epochs)), "cpu")

    def numel(batch: dict) -> int:
        return batch["input_ids"].numel()

    one, two = estimator(1), estimator(2)
    longest, later, _ = one.train_batches(8)
    cfg = one.recipe.train.model_copy(update={"batch_size": 8})
    loader, _ = make_loaders({"train": one.data.train}, one.data.task.collator(one.data.tokenizer), cfg, 1)
    run = list(loader)
    assert run[0]["input_ids"].shape == longest["input_ids"].shape
    assert later["input_ids"].shape == max(run[1:], key=numel)["input_ids"].shape and numel(later) < numel(longest)
    assert two.train_batches(8)[1] is None
    assert one.trace_for(8, False, 8, timed=False).peak("train") < two.trace_for(8, False, 8, timed=False).peak("train")


@pytest.mark.parametrize("cores, num_threads, processes, expected", [("1", None, 1, 1), ("", 3, 2, 3), ("4", None, 2, 2)])
def test_a_run_and_its_plan_time_steps_with_the_same_threads(tiny_bert, wnut_small, tmp_path, monkeypatch,
                                                              cores, num_threads, processes, expected):
    """A bench running cells side by side sets PEFTLAB_NUM_THREADS; the planner times its steps with it too."""
    from types import SimpleNamespace

    from peftlab.system import cpu_cores
    from peftlab.training.launch import set_threads

    monkeypatch.setenv("PEFTLAB_NUM_THREADS", cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    before = torch.get_num_threads()
    try:
        assert set_threads(SimpleNamespace(device=torch.device("cpu"), num_processes=processes), num_threads) == expected
        assert torch.get_num_threads() == expected
        torch.set_num_threads(7)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        recipe = as_recipe(ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 2},
                                      num_threads=num_threads))
        Estimator(recipe, "cpu")
        assert torch.get_num_threads() == (num_threads or int(cores or 0) or cpu_cores())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("grouped", [True, False])
def test_the_step_time_is_measured_on_the_runs_own_batches_spread_over_their_sizes(monkeypatch, grouped):
    """The timed batches are batches the run itself forms (its sampler, its seed), one in the middle
    of each quarter of them by padded size; the epoch's mean size is the mean over all its batches."""
    from types import SimpleNamespace

    from peftlab.planner import build

    lengths = [(i * 37) % 101 + 1 for i in range(200)]  # 1..101 shuffled, each about twice
    monkeypatch.setattr(build, "collate", lambda data, split, idx: list(idx))
    data = SimpleNamespace(train=SimpleNamespace(lengths=lambda: lengths))
    recipe = SimpleNamespace(train=SimpleNamespace(group_by_length=grouped, seed=3))
    epoch = build.epoch_batches(data, recipe, 10)
    assert sorted(i for b in epoch for i in b) == list(range(200))
    t = build.timing_batches(data, recipe, 10)
    padded = sorted(10 * max(lengths[i] for i in b) for b in epoch)
    assert all(b in epoch for b in t.batches)
    assert t.sizes == [padded[k] for k in (2, 7, 12, 17)]
    assert t.epoch_size == pytest.approx(sum(padded) / 20) and t.epoch_tokens == pytest.approx(sum(lengths) / 20)
    # length-grouped batches are nearly uniform in length, shuffled ones are padded to near the longest
    assert (t.epoch_size < 1.3 * sum(lengths) / 20) == grouped


def test_the_step_time_is_read_at_the_epochs_mean_batch_size():
    """Timed batches' times fitted against their sizes: the mean time where no rising line fits."""
    from peftlab.planner.trace import step_at

    assert step_at([100, 200, 300, 400], [1.1, 2.1, 3.1, 4.1], 320) == pytest.approx(3.3)
    assert step_at([100, 200, 300, 400], [2.0, 1.0, 1.0, 1.0], 320) == pytest.approx(1.25)  # falling: the mean
    assert step_at([100, 100], [1.0, 2.0], 300) == pytest.approx(1.5)
    assert step_at([100, 200], [1.0, 2.0], None) == pytest.approx(1.5)


def test_checkpointing_lowers_the_activations(tiny_bert, wnut_small, tmp_path):
    deep = _deeper(tiny_bert, tmp_path, 4)
    recipe = as_recipe(ner_recipe(deep, wnut_small, tmp_path / "run", {"name": "full"}))
    estimator = Estimator(recipe, "cpu")
    plain = {c.name: c.bytes for c in estimator.plan_for(16, 1, False, 32).components}
    checkpointed = {c.name: c.bytes for c in estimator.plan_for(16, 1, True, 32).components}
    assert checkpointed["activations"] < 0.8 * plain["activations"]
    assert checkpointed["optimizer state"] == plain["optimizer state"]


def _long_qa_model(tmp_path: Path) -> Path:
    """A 2-layer BERT whose activations at 256 tokens outweigh its weights: batch size matters."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from conftest import minilm_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                        intermediate_size=512, max_position_embeddings=256)
    out = tmp_path / "qa-bert"
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def _qa_recipe(backbone: Path, squad_small: dict, out: Path, **train) -> dict:
    return {
        "backbone": {"name": str(backbone)}, "task": "question_answering",
        "data": {**squad_small, "max_length": 256}, "method": {"name": "full"},
        "train": {"lr": 1e-4, "max_steps": 3, "eval_batch_size": 32, "seed": 1, "trackers": "none", **train},
        "output": {"dir": str(out)},
    }


def test_auto_batch_size_keeps_the_run_under_a_budget_between_two_settings(squad_small, tmp_path):
    backbone = _long_qa_model(tmp_path)
    path = _write(tmp_path, _qa_recipe(backbone, squad_small, tmp_path / "unused"))
    peaks = []
    for batch, accum in ((32, 1), (8, 4)):  # planned in fresh processes, as the run plans
        res = run_cli("plan", path, f"train.batch_size={batch}", f"train.grad_accum={accum}", "--json")
        assert res.returncode == 0, res.stderr
        peaks.append(json.loads(res.stdout)["peak_bytes"])
    assert peaks[0] > peaks[1] + 64 * 2**20  # the budget below lies clearly between them
    budget = sum(peaks) // 2
    out = tmp_path / "auto"
    res = run_cli("train", _write(tmp_path, _qa_recipe(backbone, squad_small, out, batch_size="auto",
                                                       target_batch_size=32, memory_budget=budget)))
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads((out / "plan.json").read_text())
    chosen = plan["settings"]
    assert chosen["batch_size"] * chosen["grad_accum"] == 32
    assert (chosen["batch_size"], chosen["gradient_checkpointing"]) != (32, False)  # that one does not fit
    assert plan["peak_bytes"] <= budget
    assert "plan: batch" in res.stderr
    measured = json.loads((out / "resources.json").read_text())["peak_rss_bytes"]
    assert measured <= budget, (measured, budget, chosen)


def _write(tmp_path: Path, recipe: dict) -> str:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def test_a_budget_nothing_fits_is_one_line_naming_the_smallest(tiny_bert, banking_small, tmp_path):
    path = _write(tmp_path, cls_recipe(tiny_bert, banking_small, tmp_path / "run", {"name": "lora", "r": 4}))
    res = run_cli("plan", path, "--fit", "--memory", "64MiB")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing fits in 64 MiB" in lines[0] and "needs" in lines[0], res.stderr
    assert "batch 1 x 16 accum" in lines[0]


def test_plan_prints_each_component_and_the_verdict(tiny_bert, banking_small, tmp_path):
    path = _write(tmp_path, cls_recipe(tiny_bert, banking_small, tmp_path / "run", {"name": "lora", "r": 4}))
    res = run_cli("plan", path, "--memory", "64GiB")
    assert res.returncode == 0, res.stderr
    for name in ("process before the weights", "frozen weights", "gradients", "optimizer state", "activations",
                 "evaluation pass", "peak", "fits", "samples/s"):
        assert name in res.stdout, name
    res = run_cli("plan", path, "--json", "--memory", "100MiB")
    assert res.returncode == 1  # does not fit: a non-zero exit for scripts
    assert json.loads(res.stdout)["fits"] is False


@pytest.mark.parametrize("override,expected", [
    ("train.batch_size=0", "train.batch_size: expected a positive integer or auto"),
    ("train.memory_budget=lots", "train.memory_budget: expected a memory size"),
])
def test_bad_auto_settings_are_one_line(tiny_bert, banking_small, tmp_path, override, expected):
    path = _write(tmp_path, cls_recipe(tiny_bert, banking_small, tmp_path / "run", {"name": "lora", "r": 4}))
    res = run_cli("plan", path, override)
    assert res.returncode == 2 and expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = run_cli("plan", path, "--memory", "a lot")
    assert res.returncode == 2 and "--memory: 'a lot' is not a memory size" in res.stderr
