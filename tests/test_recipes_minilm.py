"""Every shipped MiniLM recipe, as written (method, options, quantization, learning rates,
schedule), trains on the real packaged all-MiniLM-L6-v2 and its loss falls.

Only the data is made small (a slice of the same WNUT-17 / BANKING77 / SQuAD files) and the run short
(max_steps), so this checks each recipe's mechanics and settings, not its final score: the full
runs and their scores are in the README and benchmarks/.
"""

from __future__ import annotations

import json

import pytest
import yaml

import peftlab
from conftest import ROOT

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                 if yaml.safe_load(p.read_text())["task"] != "causal_lm")
STEPS = {"token_classification": 16, "sequence_classification": 32, "question_answering": 16}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_on_minilm_and_loss_falls(path, wnut_small, banking_small, squad_small, tmp_path):
    raw = yaml.safe_load(path.read_text())
    assert raw["backbone"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    ner, qa = raw["task"] == "token_classification", raw["task"] == "question_answering"
    files = wnut_small if ner else squad_small if qa else banking_small
    data = [f"data.train={files['train']}", f"data.test={files['test']}"]
    data += [f"data.validation={files['validation']}"] if ner else ["data.validation_split=0.2"]
    steps = STEPS[raw["task"]]  # batches of 8 over the small slice; warmup = the recipe's share of them
    recipe = peftlab.load_recipe(path, data + [f"train.max_steps={steps}", "train.batch_size=8", "train.log_every=1",
                                              "train.num_threads=1", "train.trackers=none",
                                              f"output.dir={tmp_path / 'run'}"])
    metrics = peftlab.train(recipe)
    losses = [loss for _, loss in metrics["train_loss"]]
    assert len(losses) == steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # 8% below the first steps' mean is well outside batch-to-batch noise
    assert last < 0.92 * first, (path.name, losses)
    out = tmp_path / "run"
    params = json.loads((out / "params.json").read_text())
    assert 0 < params["trainable_params"] <= params["total_params"]
    if raw["method"]["name"] not in ("full", "head"):  # head also unfreezes its last layers
        assert params["trainable_pct_without_head"] < 12, params  # frozen backbone: a small fraction trains
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["method"] == {**resolved["method"], **raw["method"]}  # the recipe's own method settings ran
    assert resolved["backbone"]["quantization"] == raw["backbone"].get("quantization", "none")
    key = "f1" if ner or qa else "accuracy"
    assert 0 <= metrics["test"][key] <= (100 if qa else 1)  # SQuAD scores are percentages
