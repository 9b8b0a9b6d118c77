"""The CRF head of token classification (task_options.head: crf): Viterbi and the likelihood against
brute force on short sequences, IOB2-forbidden transitions never decoded, the IOB2 repair keeping
seqeval's entities, and training / saving / merging / predicting with several methods."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import peftlab
import peftlab.api
from conftest import ner_recipe
from peftlab.metrics import get_entities
from peftlab.tasks.crf import CRFClassifier, compact, iob2_allowed, repair_iob2

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _random_head(seed: int, allowed=None) -> CRFClassifier:
    torch.manual_seed(seed)
    head = CRFClassifier(3, len(TAGS), allowed)
    with torch.no_grad():
        for name in ("transitions", "start_transitions", "end_transitions"):
            getattr(head, name).normal_()
    return head


@torch.no_grad()
def _path_score(head, em, path, allowed) -> float:
    if allowed is not None:
        if not allowed[-1, path[0]] or any(not allowed[a, b] for a, b in zip(path, path[1:])):
            return float("-inf")
    s = head.start_transitions[path[0]] + em[0, path[0]]
    for t in range(1, len(path)):
        s = s + head.transitions[path[t - 1], path[t]] + em[t, path[t]]
    return float(s + head.end_transitions[path[-1]])


@pytest.mark.parametrize("constrained", [False, True])
def test_viterbi_and_nll_match_brute_force(constrained):
    allowed = iob2_allowed(TAGS) if constrained else None
    for seed in range(6):
        head = _random_head(seed, allowed)
        lengths = [1, 2, 3, 4]
        em = torch.randn(len(lengths), max(lengths), len(TAGS)) * 2
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        decoded = head.viterbi(em, mask)
        gold = torch.randint(0, len(TAGS), (len(lengths), max(lengths)))
        if constrained:  # a gold path must be allowed for its likelihood to be defined
            gold = torch.tensor([[TAGS.index(t) for t in repair_iob2([TAGS[i] for i in row])] for row in gold.tolist()])
        nll = head.nll(em, gold, mask)
        for b, n in enumerate(lengths):
            paths = list(itertools.product(range(len(TAGS)), repeat=n))
            scores = [_path_score(head, em[b], p, allowed) for p in paths]
            best = max(range(len(paths)), key=lambda k: scores[k])
            assert decoded[b] == list(paths[best])
            log_z = torch.logsumexp(torch.tensor(scores), 0)
            expected = float(log_z) - _path_score(head, em[b], tuple(gold[b, :n].tolist()), allowed)
            assert float(nll[b]) == pytest.approx(expected, abs=1e-4)


def test_forbidden_transitions_are_never_decoded():
    allowed = iob2_allowed(TAGS)
    assert not allowed[0, TAGS.index("I-PER")] and not allowed[-1, TAGS.index("I-LOC")]
    assert allowed[TAGS.index("B-PER"), TAGS.index("I-PER")] and not allowed[TAGS.index("B-LOC"), TAGS.index("I-PER")]
    head = _random_head(0, allowed)
    torch.manual_seed(1)
    em = torch.randn(64, 7, len(TAGS)) * 5
    em[:, :, TAGS.index("I-PER")] += 8.0  # emissions that want I-PER everywhere, from the first word
    paths = head.viterbi(em, torch.ones(64, 7, dtype=torch.bool))
    for path in paths:
        tags = [TAGS[i] for i in path]
        assert repair_iob2(tags) == tags, tags  # only IOB2-valid sequences
    assert any("I-PER" in [TAGS[i] for i in p] for p in paths)


def test_iob2_repair_keeps_the_entities_seqeval_reads():
    rng = random.Random(0)
    for _ in range(500):
        tags = [rng.choice(TAGS) for _ in range(rng.randint(1, 8))]
        repaired = repair_iob2(tags)
        assert get_entities(repaired) == get_entities(tags)
        assert all(not t.startswith("I-") or (i and repaired[i - 1][2:] == t[2:] and repaired[i - 1] != "O")
                   for i, t in enumerate(repaired))


def test_compact_moves_labelled_positions_to_the_front():
    labels = torch.tensor([[-100, 1, -100, 2, 3], [-100, -100, 4, -100, -100]])
    values = torch.arange(10).view(2, 5)
    out, mask = compact(values, labels)
    assert out.tolist() == [[1, 3, 4], [7, 0, 0]] and mask.tolist() == [[True, True, True], [True, False, False]]


METHODS = [{"name": "full"}, {"name": "lora", "r": 4, "target_modules": "all-linear"},
           {"name": "adapter", "reduction_factor": 4}, {"name": "head"}, {"name": "prefix", "num_virtual_tokens": 4}]


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_crf_head_trains_saves_and_predicts_with_every_method(tiny_bert, wnut_small, tmp_path, method):
    run = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, run, method, epochs=2, num_threads=1)
    recipe["task_options"] = {"head": "crf"}
    metrics = peftlab.train(recipe)
    assert {"f1", "precision", "recall", "loss"} <= set(metrics["test"])
    loaded = peftlab.runs.load_run(run)
    heads = [m for m in loaded.model.modules() if isinstance(m, CRFClassifier)]
    assert heads and any(float(h.transitions.abs().sum()) > 0 for h in heads)  # trained, saved, loaded back
    texts = ["Emma flew to Paris with John", "nothing here", "London calling"]
    rows = peftlab.api.predict(run, texts)
    again = peftlab.api.predict(run, texts)
    assert rows == again
    for row in rows:
        for ent in row["entities"]:
            assert row["text"][ent["start"]:ent["end"]] == ent["text"]


def test_crf_run_merges_and_peftlab_predicts_the_merged_checkpoint_the_same(tiny_bert, wnut_small, tmp_path):
    run = tmp_path / "run"
    recipe = ner_recipe(tiny_bert, wnut_small, run, {"name": "lora", "r": 4, "target_modules": "all-linear"},
                        epochs=2, num_threads=1)
    recipe["task_options"] = {"head": "crf"}
    peftlab.train(recipe)
    report = peftlab.merge(run, tmp_path / "merged")
    assert report["passed"]
    texts = [" ".join(s) for s in ([["Emma", "flew", "to", "Paris"], ["I", "love", "New", "York", "City"]])]
    assert peftlab.api.predict(tmp_path / "merged", texts) == peftlab.api.predict(run, texts)
    # plain transformers loads the merged checkpoint: the emission layer (the transitions are peftlab's)
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged")
    assert type(model.classifier) is torch.nn.Linear
    assert json.loads((tmp_path / "merged" / "peftlab_merge.json").read_text())["recipe"]["task_options"]["head"] == "crf"
