"""Task logic: first-sub-token label alignment and scoring against every gold word."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import minilm_path
from peftlab.errors import PeftlabError
from peftlab.recipe import recipe_from_dict
from peftlab.tasks import EncodedSplit, get_task_class
from peftlab.tasks.token_classification import score_entities, sort_tags


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def ner_task(max_length=128):
    r = recipe_from_dict({"backbone": {"name": "x"}, "task": "token_classification",
                          "data": {"train": "t.conll", "max_length": max_length}, "method": "full"})
    task = get_task_class("token_classification")(r)
    task.set_labels(sort_tags({"O", "B-person", "I-person", "B-location"}))
    return task


def test_tag_order():
    assert sort_tags({"I-person", "O", "B-location", "B-person"}) == ["O", "B-location", "B-person", "I-person"]


def test_first_subtoken_gets_the_label(tokenizer):
    task = ner_task()
    ex = {"tokens": ["Schwarzenegger", "visited", "Tokyo"], "tags": ["B-person", "O", "B-location"]}
    enc = task.encode([ex], tokenizer, "train")
    feat = enc.features[0]
    pieces = tokenizer.convert_ids_to_tokens(feat["input_ids"])
    assert len(pieces) > 5  # [CLS] + several pieces for the name + visited + tokyo + [SEP]
    labelled = [(p, task.labels[label]) for p, label in zip(pieces, feat["labels"]) if label != -100]
    assert labelled == [(pieces[1], "B-person"), ("visited", "O"), ("tokyo", "B-location")]
    assert feat["labels"][0] == -100 and feat["labels"][-1] == -100
    assert all(lab == -100 for lab in feat["labels"][2:pieces.index("visited")])


def test_words_without_subtokens_and_truncated_tails_count_as_O(tokenizer):
    """Scoring is against every gold word: a word that got no sub-token is predicted O."""
    task = ner_task(max_length=6)
    # "\u200b" (zero-width space) yields no sub-token; the tail beyond max_length is cut off
    ex = {"tokens": ["\u200b", "Paris", "is", "nice", "says", "Macron", "today"],
          "tags": ["B-person", "B-location", "O", "O", "O", "B-person", "O"]}
    enc = task.encode([ex], tokenizer, "test")
    kept = enc.extra["kept_words"][0]
    assert 0 not in kept and 5 not in kept and 1 in kept
    # predict the gold tag everywhere a sub-token exists
    ids = [[task.label2id[ex["tags"][w]] for w in kept]]
    pred = task.word_predictions(ids, EncodedSplit(enc.features, [ex], enc.extra))[0]
    assert len(pred) == len(ex["tags"])
    assert pred[0] == "O" and pred[5] == "O" and pred[1] == "B-location"
    scores = score_entities([ex["tags"]], [pred], 0.0)
    assert scores["recall"] == pytest.approx(1 / 3)  # 3 gold entities, only Paris is reachable
    assert scores["precision"] == 1.0


def test_sorted_by_length_keeps_alignment(tokenizer):
    task = ner_task()
    exs = [{"tokens": ["a"] * n, "tags": ["O"] * n} for n in (2, 9, 4)]
    enc = task.encode(exs, tokenizer, "test").sorted_by_length()
    assert [len(e["tokens"]) for e in enc.examples] == [9, 4, 2]
    assert [len(k) for k in enc.extra["kept_words"]] == [9, 4, 2]


def test_classification_evaluate_accuracy_and_macro_f1(tokenizer):
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers.modeling_outputs import SequenceClassifierOutput

    r = recipe_from_dict({"backbone": {"name": "x"}, "task": "sequence_classification",
                          "data": {"train": "t.csv"}, "method": "full"})
    task = get_task_class("sequence_classification")(r)
    task.set_labels(["a", "b", "c"])
    exs = [{"text": t, "label": lab} for t, lab in [("x", "a"), ("y", "b"), ("z", "b"), ("w", "c")]]
    enc = task.encode(exs, tokenizer, "test")
    guesses = {"x": 0, "y": 1, "z": 0, "w": 2}  # one mistake: z (b) -> a
    by_id = {tokenizer(t)["input_ids"][1]: g for t, g in guesses.items()}

    class Fake(torch.nn.Module):
        def forward(self, input_ids, labels=None, **kw):
            logits = torch.nn.functional.one_hot(torch.tensor([by_id[int(i[1])] for i in input_ids]), 3).float()
            return SequenceClassifierOutput(loss=torch.tensor(0.5), logits=logits)

    dl = DataLoader(enc, batch_size=3, collate_fn=task.collator(tokenizer))
    m = task.evaluate(Fake(), dl, Accelerator(cpu=True), enc)
    assert m["accuracy"] == 0.75
    # per class F1: a = 2/3, b = 2/3, c = 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # the loss: cross-entropy per example from the logits (counted once each, whatever the batching)
    right, wrong = -math.log(math.e / (math.e + 2)), -math.log(1 / (math.e + 2))
    assert m["loss"] == pytest.approx((3 * right + wrong) / 4)


@pytest.mark.parametrize("name, arch, peft_type, tag", [
    ("token_classification", "ForTokenClassification", "TOKEN_CLS", "token-classification"),
    ("sequence_classification", "ForSequenceClassification", "SEQ_CLS", "text-classification"),
    ("causal_lm", "ForCausalLM", "CAUSAL_LM", "text-generation"),
])
def test_a_task_owns_what_merge_cards_and_predict_ask_of_it(name, arch, peft_type, tag):
    from types import SimpleNamespace

    from peftlab.deploy.card import _pipeline_tag, _usage
    from peftlab.predict import task_of_config
    from peftlab.tasks import get_task_class

    cls = get_task_class(name)
    assert (cls.architecture(), cls.peft_task_type, cls.pipeline_tag) == (arch, peft_type, tag)
    assert task_of_config(SimpleNamespace(architectures=[f"Llama{arch}"]), Path("m")) == name
    assert _pipeline_tag(name) == tag
    assert any("some/model" in line for line in _usage(name, "some/model"))
    assert cls.has_labels == (name != "causal_lm")


def test_an_unknown_head_architecture_names_every_registered_one():
    from types import SimpleNamespace

    from peftlab.predict import task_of_config

    with pytest.raises(PeftlabError, match=r"m/config.json: architectures: expected one of .*\*ForTokenClassification"):
        task_of_config(SimpleNamespace(architectures=["BertModel"]), Path("m"))


def test_tasks_command_lists_each_task_with_its_metrics_and_options():
    from conftest import run_cli

    res = run_cli("tasks")
    assert res.returncode == 0, res.stderr
    blocks = {b.split("\n")[0]: b for b in res.stdout.strip().split("\n") if not b.startswith(" ")}
    assert set(blocks) == {"causal_lm", "question_answering", "sequence_classification", "token_classification"}
    assert "head='softmax'" in res.stdout and "doc_stride=128" in res.stdout
    assert "metrics: f1, exact_match, loss" in res.stdout
