"""peftlab.metrics against the libraries it stands in for: seqeval's default-mode entity scores and
scikit-learn's macro-F1, on random tag sequences (IOB2, IOB1-style I- starts, IOBES, malformed mixes)."""

from __future__ import annotations

import random
import warnings

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities
from sklearn.metrics import f1_score as sk_f1

from peftlab import metrics

TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER", "I-ORG", "B-ORG", "E-PER",
        "S-LOC", "B-MISC-X", "I-MISC-X"]


def _sentences(rng: random.Random, n: int) -> list[list[str]]:
    return [[rng.choice(TAGS) for _ in range(rng.randint(0, 9))] for _ in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_entity_scores_equal_seqeval(seed):
    rng = random.Random(seed)
    y_true, y_pred = _sentences(rng, 12), _sentences(rng, 0)
    y_pred = [[t if rng.random() < 0.6 else rng.choice(TAGS) for t in s] for s in y_true]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
        ref_f1 = f1_score(y_true, y_pred, zero_division=0)
        ref_p = precision_score(y_true, y_pred, zero_division=0)
        ref_r = recall_score(y_true, y_pred, zero_division=0)
    got = metrics.entity_scores(y_true, y_pred)
    assert got["f1"] == pytest.approx(ref_f1, abs=1e-12)
    assert got["precision"] == pytest.approx(ref_p, abs=1e-12)
    assert got["recall"] == pytest.approx(ref_r, abs=1e-12)
    ref_types = {k: v for k, v in ref.items() if k not in ("micro avg", "macro avg", "weighted avg")}
    assert list(got["per_type"]) == list(ref_types)
    for name, v in ref_types.items():
        mine = got["per_type"][name]
        assert mine["support"] == v["support"]
        for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert mine[key] == pytest.approx(v[ref_key], abs=1e-12), (name, key)


@pytest.mark.parametrize("seed", range(40))
def test_get_entities_equals_seqeval(seed):
    seq = _sentences(random.Random(seed), 1)[0] + ["I-PER", "E-PER", "S-LOC", "I-LOC", "B-LOC"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics.get_entities(seq) == seqeval_entities(seq)


def test_perfect_and_empty():
    gold = [["B-PER", "I-PER", "O"], ["B-LOC"]]
    assert metrics.entity_scores(gold, gold)["f1"] == 1.0
    none = metrics.entity_scores([["O"]], [["O"]])
    assert (none["f1"], none["precision"], none["recall"], none["per_type"]) == (0.0, 0.0, 0.0, {})


@pytest.mark.parametrize("seed", range(20))
def test_macro_f1_equals_sklearn(seed):
    rng = random.Random(seed)
    gold = [rng.randrange(6) for _ in range(rng.randint(1, 60))]
    pred = [g if rng.random() < 0.5 else rng.randrange(8) for g in gold]
    assert metrics.macro_f1(gold, pred) == pytest.approx(sk_f1(gold, pred, average="macro", zero_division=0),
                                                         abs=1e-12)


def test_training_process_imports_neither_library():
    """The point of the module: a task's import and scoring pull in no scikit-learn or seqeval."""
    import subprocess
    import sys

    code = ("import sys; from peftlab.tasks import get_task_class; "
            "get_task_class('token_classification'); get_task_class('sequence_classification'); "
            "from peftlab.metrics import entity_scores; entity_scores([['B-X']], [['B-X']]); "
            "print(sorted(m for m in ('sklearn', 'seqeval', 'scipy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
