"""Data readers: CoNLL with tab-only breaks, CSV/JSONL columns, held-out split, label checks."""

from __future__ import annotations

import json

import pytest

from conftest import BANKING, WNUT, write_conll
from peftlab.data import load_splits, read_conll, read_table
from peftlab.errors import PeftlabError
from peftlab.recipe import DataConfig


def test_wnut_sentence_counts_match_the_data_readme():
    assert len(read_conll(WNUT / "wnut17train.conll")) == 3394
    assert len(read_conll(WNUT / "emerging.dev.conll")) == 1009
    assert len(read_conll(WNUT / "emerging.test.annotated")) == 1287


def test_conll_whitespace_only_line_is_a_break(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("a\tO\nb\tB-x\n\t\nc\tI-x\n \nd\tO\n", encoding="utf-8")
    sents = read_conll(p)
    assert [s["tokens"] for s in sents] == [["a", "b"], ["c"], ["d"]]
    assert sents[1]["tags"] == ["I-x"]


def test_conll_line_without_tag_names_file_and_line(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("a\tO\nlonely\n", encoding="utf-8")
    with pytest.raises(PeftlabError, match=r"a.conll:2: expected 'TOKEN<TAB>TAG', found no tag"):
        read_conll(p)


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "a.conll"
    p.write_bytes(b"a\tO\n\xff\tO\n")
    with pytest.raises(PeftlabError, match=r"a.conll:2: not UTF-8 text \(byte 0xff\)"):
        read_conll(p)


def test_banking_csv_with_crlf_and_category_column():
    rows = read_table(BANKING / "train.csv", ",", ["text", "category"], "train")
    assert len(rows) == 10003
    assert rows[0]["category"] == "card_arrival"
    assert not rows[0]["text"].endswith("\r")


def test_csv_missing_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("sentence,category\nhi,a\n", encoding="utf-8")
    with pytest.raises(PeftlabError, match=r"t.csv:1: no column 'text' in the header \(columns: sentence, category\)"):
        read_table(p, ",", ["text", "category"], "train")


def test_held_out_validation_is_fixed_by_seed_and_disjoint():
    cfg = DataConfig(train=str(BANKING / "train.csv"), label_column="category")
    a = load_splits(cfg, ["text", "category"], "text")
    b = load_splits(cfg, ["text", "category"], "text")
    assert len(a.validation) == 1000 and len(a.train) == 9003
    assert [r["_where"] for r in a.validation] == [r["_where"] for r in b.validation]
    assert not {r["_where"] for r in a.validation} & {r["_where"] for r in a.train}
    c = load_splits(cfg.model_copy(update={"split_seed": 7}), ["text", "category"], "text")
    assert [r["_where"] for r in c.validation] != [r["_where"] for r in a.validation]


def test_max_train_samples_subset():
    cfg = DataConfig(train=str(BANKING / "train.csv"), label_column="category", max_train_samples=3000)
    s = load_splits(cfg, ["text", "category"], "text")
    assert len(s.train) == 3000
    assert any("subset of 3000" in n for n in s.notes)


def test_max_test_samples_subset():
    cfg = DataConfig(train=str(BANKING / "train.csv"), test=str(BANKING / "test.csv"), label_column="category")
    full = load_splits(cfg, ["text", "category"], "text")
    a = load_splits(cfg.model_copy(update={"max_test_samples": 1000}), ["text", "category"], "text")
    b = load_splits(cfg.model_copy(update={"max_test_samples": 1000}), ["text", "category"], "text")
    assert len(full.test) == 3080 and len(a.test) == 1000
    where = [r["_where"] for r in a.test]
    assert where == [r["_where"] for r in b.test]  # fixed seed: the same subset every time
    assert set(where) < {r["_where"] for r in full.test} and where == sorted(where, key=lambda w: int(w.split(":")[-1]))
    assert any("test: fixed-seed subset of 1000 of 3080" in n for n in a.notes)
    assert len(a.train) == len(full.train)  # train and validation untouched


def test_jsonl_reader_and_empty_split(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "hi", "label": "a"}) + "\n\n" + json.dumps({"text": "yo", "label": "b"}) + "\n")
    s = load_splits(DataConfig(train=str(p), validation=str(p)), ["text", "label"], "text")
    assert [r["text"] for r in s.train] == ["hi", "yo"]
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(PeftlabError, match=r"data.validation: no examples in .*e.jsonl \(empty split\)"):
        load_splits(DataConfig(train=str(p), validation=str(empty)), ["text", "label"], "text")


def test_unseen_label_in_dev_names_file_and_line(tmp_path):
    from peftlab.recipe import recipe_from_dict
    from peftlab.tasks import get_task_class

    train = write_conll(tmp_path / "train.conll", [[("a", "O"), ("b", "B-x")]])
    dev = write_conll(tmp_path / "dev.conll", [[("a", "O")], [("c", "B-y")]])
    r = recipe_from_dict({"backbone": {"name": "x"}, "task": "token_classification",
                          "data": {"train": str(train), "validation": str(dev)}, "method": "full"})
    with pytest.raises(PeftlabError, match=r"dev.conll:3: label 'B-y' in the validation split does not occur in train"):
        get_task_class("token_classification")(r).load_splits()


def test_hub_source_converts_class_labels(monkeypatch):
    """A `datasets` hub name: its ClassLabel ids become label names (load_dataset mocked offline)."""
    import datasets

    feats = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-x", "I-x"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["a", "b"], ["c"]], "ner_tags": [[0, 1], [2]]}, features=feats)
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(hub="wnut_17", train="train", validation="validation", tags_column="ner_tags")
    s = load_splits(cfg, ["tokens", "ner_tags"], "tokens")
    assert s.train[0]["ner_tags"] == ["O", "B-x"] and s.train[1]["ner_tags"] == ["I-x"]
    assert calls == [("wnut_17", None, "train"), ("wnut_17", None, "validation")]


def test_conll_empty_token_lines_are_skipped_with_one_note(tmp_path):
    """Corpora in the wild (the Broad Twitter Corpus) hold `<TAB>O` lines: no word, so no token."""
    p = tmp_path / "btc.conll"
    p.write_text("Hi\tO\n\tO\nJo\tB-person\n\n\tO\nok\tO\n", encoding="utf-8")
    notes: list[str] = []
    sents = read_conll(p, "train", notes)
    assert [s["tokens"] for s in sents] == [["Hi", "Jo"], ["ok"]]
    assert [s["tags"] for s in sents] == [["O", "B-person"], ["O"]]
    assert notes == [f"{p}:2: skipped 2 line(s) whose token is empty (a tag with no word)"]


def test_a_csv_cell_longer_than_csv_default_limit_is_data(tmp_path):
    p = tmp_path / "long.csv"
    long_text = "word " * 40_000  # 200 KB, over the csv module's default 128 KiB field limit
    p.write_text(f"text,label\n\"{long_text}\",a\nshort,b\n", encoding="utf-8")
    rows = read_table(p, ",", ["text", "label"], "train")
    assert [len(r["text"]) for r in rows] == [len(long_text), 5]
