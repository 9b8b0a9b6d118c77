"""sequence_classification beyond one label per text: sentence pairs (data.text_pair_column),
several labels per text (data.problem: multi_label) and a number per text (regression), trained on
a tiny BERT from small files; their metrics checked against scipy/scikit-learn; bad rows refused."""

from __future__ import annotations

import json
import math
import random

import pytest

import peftlab
from conftest import ner_recipe
from peftlab import metrics
from peftlab.errors import PeftlabError

WORDS = "good bad great awful fine poor nice terrible happy sad calm angry".split()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _recipe(tiny_bert, tmp_path, files: dict, data: dict, **train):
    r = ner_recipe(tiny_bert, files, tmp_path / "run", {"name": "full"}, epochs=2, lr=5e-3, batch_size=8,
                   num_threads=1, **train)
    r["task"] = "sequence_classification"
    r["data"].update(data)
    return r


def _pairs(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        rows.append({"text": f"the movie was {a}", "text2": f"people said {b}", "label": "same" if a == b else "diff",
                     "tags": sorted({t for t, w in (("pos", a), ("neg", b)) if WORDS.index(w) % 2 == 0}),
                     "score": WORDS.index(a) / 3.0 + (0.5 if a in ("good", "great") else 0.0)})
    return rows


@pytest.fixture()
def files(tmp_path):
    return {"train": _jsonl(tmp_path / "train.jsonl", _pairs(48, 1)),
            "validation": _jsonl(tmp_path / "dev.jsonl", _pairs(16, 2)),
            "test": _jsonl(tmp_path / "test.jsonl", _pairs(16, 3))}


def test_sentence_pairs_are_encoded_as_pairs(tiny_bert, tmp_path, files):
    from peftlab.backbones import load_tokenizer
    from peftlab.recipe import recipe_from_dict
    from peftlab.tasks import get_task_class

    recipe = recipe_from_dict(_recipe(tiny_bert, tmp_path, files, {"text_pair_column": "text2"}))
    task = get_task_class("sequence_classification")(recipe)
    splits = task.load_splits()
    enc = task.encode(splits.train[:2], load_tokenizer(recipe.backbone), "train")
    feat = enc.features[0]
    assert 1 in feat["token_type_ids"] and feat["token_type_ids"][0] == 0  # second segment present
    assert feat["input_ids"].count(102) == 2  # [SEP] after each text
    result = peftlab.train(recipe)
    assert set(result["test"]) >= {"accuracy", "macro_f1", "loss"}


def test_multi_label_trains_and_tests_at_the_dev_threshold(tiny_bert, tmp_path, files):
    result = peftlab.train(_recipe(tiny_bert, tmp_path, files, {"problem": "multi_label", "label_column": "tags"},
                                   metric="micro_f1"))
    dev, test = result["dev"], result["test"]
    assert set(test) >= {"micro_f1", "macro_f1", "subset_accuracy", "threshold", "loss"}
    assert test["threshold"] == dev["threshold"]  # the threshold is chosen on validation only
    pred = peftlab.api.predict(tmp_path / "run", ["the movie was good"])[0]
    assert set(pred) == {"text", "labels", "threshold", "probabilities"}
    assert pred["threshold"] == dev["threshold"] and set(pred["probabilities"]) == {"neg", "pos"}
    assert pred["labels"] == [k for k, v in pred["probabilities"].items() if v >= pred["threshold"]]


def test_multi_label_csv_cells_are_split_on_the_separator(tiny_bert, tmp_path):
    rows = [("the movie was good", "pos;fun"), ("it was bad", "neg"), ("fine and calm", "")] * 6
    for name in ("train", "dev"):
        (tmp_path / f"{name}.csv").write_text("text,tags\n" + "".join(f"{t},{g}\n" for t, g in rows))
    recipe = _recipe(tiny_bert, tmp_path, {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.csv")},
                     {"problem": "multi_label", "label_column": "tags", "label_separator": ";"}, metric="micro_f1")
    from peftlab.recipe import recipe_from_dict
    from peftlab.tasks import get_task_class

    task = get_task_class("sequence_classification")(recipe_from_dict(recipe))
    splits = task.load_splits()
    assert task.labels == ["fun", "neg", "pos"]
    assert [ex["tags"] for ex in splits.train[:3]] == [["fun", "pos"], ["neg"], []]


def test_regression_reports_correlations_and_mse(tiny_bert, tmp_path, files):
    result = peftlab.train(_recipe(tiny_bert, tmp_path, files, {"problem": "regression", "label_column": "score"},
                                   metric="mse"))
    test = result["test"]
    assert set(test) >= {"pearson", "spearman", "mse", "loss"} and "accuracy" not in test
    assert test["mse"] == pytest.approx(test["loss"], rel=1e-4)  # the head's MSE loss is the metric
    pred = peftlab.api.predict(tmp_path / "run", ["the movie was great"])[0]
    assert set(pred) == {"text", "score"} and math.isfinite(pred["score"])


@pytest.mark.parametrize("data, rows, message", [
    ({"problem": "regression", "label_column": "score"}, [{"text": "a", "score": "high"}],
     r"train.jsonl:1: label 'score' is 'high'; expected a finite number \(data.problem: regression\)"),
    ({"problem": "regression", "label_column": "score"}, [{"text": "a", "score": None}],
     r"train.jsonl:1: label 'score' is None; expected a finite number"),
    ({"problem": "multi_label", "label_column": "tags"}, [{"text": "a", "tags": [1, 2]}],
     r"train.jsonl:1: label 'tags' is list; expected a list of strings"),
    ({"text_pair_column": "text2"}, [{"text": "a", "text2": "", "label": "x"}],
     r"train.jsonl:1: 'text2' is empty"),
    ({"text_pair_column": "text2"}, [{"text": "a", "label": "x"}],
     r"train.jsonl:1: no key 'text2' \(keys: text, label\); the recipe names it in data.text_pair_column$"),
])
def test_bad_rows_are_one_line(tiny_bert, tmp_path, data, rows, message):
    train = _jsonl(tmp_path / "train.jsonl", rows * 4)
    recipe = _recipe(tiny_bert, tmp_path, {"train": train}, {**data, "validation_split": 0.5})
    with pytest.raises(PeftlabError, match=message):
        peftlab.train(recipe)


def test_a_metric_of_another_problem_is_refused(tiny_bert, tmp_path, files):
    recipe = _recipe(tiny_bert, tmp_path, files, {"problem": "regression", "label_column": "score"}, metric="accuracy")
    with pytest.raises(PeftlabError, match=r"train.metric: 'accuracy' is not a metric of sequence_classification "
                                           r"with data.problem regression \(choose one of: pearson, spearman, mse, loss\)"):
        peftlab.train(recipe)


@pytest.mark.parametrize("seed", range(10))
def test_correlations_and_multilabel_f1_equal_scipy_and_sklearn(seed):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score

    rng = random.Random(seed)
    x = [rng.choice([0.0, 1.0, 2.5, rng.random()]) for _ in range(30)]  # ties on purpose
    y = [v + rng.gauss(0, 1) for v in x]
    assert metrics.pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-10)
    assert metrics.spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-10)
    gold = [[rng.randint(0, 1) for _ in range(5)] + [0] for _ in range(20)]  # the last label never occurs
    pred = [[g if rng.random() < 0.7 else 1 - g for g in row[:5]] + [0] for row in gold]
    micro, macro = metrics.multilabel_f1(gold, pred)
    assert micro == pytest.approx(f1_score(gold, pred, average="micro", zero_division=0), abs=1e-12)
    assert macro == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert math.isnan(metrics.pearson([1.0, 1.0], [2.0, 3.0]))


@pytest.mark.parametrize("data, check", [
    ({"problem": "regression", "label_column": "score"}, "score"),
    ({"problem": "multi_label", "label_column": "tags"}, "multi"),
    ({"text_pair_column": "text2"}, "pair"),
])
def test_merged_checkpoint_runs_in_the_text_classification_pipeline(tiny_bert, tmp_path, files, data, check):
    """LoRA merges and verifies for every problem; plain transformers reads the problem type back."""
    from transformers import pipeline

    from peftlab.deploy import merge

    recipe = _recipe(tiny_bert, tmp_path, files, data)
    recipe["method"] = {"name": "lora", "r": 4}
    peftlab.train(recipe)
    report = merge(tmp_path / "run", tmp_path / "merged", verify_examples=16)
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    classify = pipeline("text-classification", model=str(tmp_path / "merged"))
    if check == "pair":
        out = classify({"text": "the movie was good", "text_pair": "people said good"})
        assert out["label"] in {"same", "diff"}
    elif check == "score":  # regression: the raw score, no softmax or sigmoid
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
        assert model.config.problem_type == "regression" and model.config.num_labels == 1
        tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
        raw = float(model(**tok("the movie was great", return_tensors="pt")).logits[0, 0])
        assert classify("the movie was great")[0]["score"] == pytest.approx(raw, abs=1e-5)
    else:
        out = classify("the movie was good", top_k=None)
        assert {o["label"] for o in out} == {"neg", "pos"}
        assert all(0.0 <= o["score"] <= 1.0 for o in out)
        # peftlab predict on the merged folder applies the run's validation threshold, as on the run
        from peftlab.predict import predict

        dev = json.loads((tmp_path / "run" / "metrics.json").read_text())["dev"]["threshold"]
        texts = ["the movie was good", "people said awful"]
        on_merged, on_run = predict(tmp_path / "merged", texts), predict(tmp_path / "run", texts)
        assert [r["threshold"] for r in on_merged] == [dev, dev]
        assert [r["labels"] for r in on_merged] == [r["labels"] for r in on_run]
