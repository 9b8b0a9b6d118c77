"""peftlab predict: run folders, merged checkpoints and exports give the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftlab
from conftest import cls_recipe, read_sentences
from peftlab import cli
from peftlab.errors import PeftlabError
from peftlab.deploy import merge
from peftlab.predict import load_predictor, predict, split_words, tag_spans
from peftlab.predict_cli import read_inputs


@pytest.fixture(scope="module")
def ner_merged(ner_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict-merged") / "m"
    merge(ner_run, out, verify_examples=16, eval_split="none")
    return out


def test_split_words_keeps_offsets():
    text = "@jo_bloggs: see https://t.co/x1 at St. Paul's  #NYC2017 -- don't!"
    words = split_words(text)
    assert all(text[s:e] == w for w, s, e in words)
    assert [w for w, _, _ in words] == ["@jo_bloggs", ":", "see", "https://t.co/x1", "at", "St", ".", "Paul's",
                                         "#NYC2017", "-", "-", "don't", "!"]
    assert split_words("   ") == []


def test_tag_spans_read_iob2_like_the_evaluator():
    tags = ["B-person", "I-person", "O", "I-location", "B-location", "B-group", "I-person"]
    assert tag_spans(tags) == [("person", 0, 1), ("location", 3, 3), ("location", 4, 4), ("group", 5, 5),
                               ("person", 6, 6)]
    assert tag_spans(["PER", "PER", "O", "LOC"], iob=False) == [("PER", 0, 1), ("LOC", 3, 3)]


def test_run_dir_and_merged_checkpoint_give_the_same_entities(ner_run, ner_merged, wnut_small):
    texts = read_sentences(wnut_small["train"], 40) + ["", "just one more tweet about Paris and Emma"]
    from_run = predict(ner_run, texts, batch_size=8)
    from_merged = predict(ner_merged, texts, batch_size=8)
    assert load_predictor(ner_run).source == "run" and load_predictor(ner_merged).source == "merged"
    assert len(from_run) == len(texts) and [r["text"] for r in from_run] == texts
    n_entities = sum(len(r["entities"]) for r in from_run)
    assert n_entities > 0  # the comparison is not vacuous
    strip = lambda rows: [[(e["text"], e["type"], e["start"], e["end"]) for e in r["entities"]] for r in rows]  # noqa: E731
    assert strip(from_run) == strip(from_merged)
    for a, b in zip(from_run, from_merged):
        for ea, eb in zip(a["entities"], b["entities"]):
            assert ea["score"] == pytest.approx(eb["score"], abs=1e-4)
    labels = {t.split("-", 1)[1] for t in json.loads((ner_run / "labels.json").read_text()) if t != "O"}
    for text, row in zip(texts, from_run):
        for e in row["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["type"] in labels and 0 < e["score"] <= 1


def test_batching_does_not_change_predictions(ner_run, wnut_small):
    texts = read_sentences(wnut_small["validation"], 20)
    predictor = load_predictor(ner_run)
    one = predict(predictor, texts, batch_size=1)
    many = predict(predictor, texts, batch_size=7)
    assert [[(e["start"], e["end"], e["type"]) for e in r["entities"]] for r in one] == \
           [[(e["start"], e["end"], e["type"]) for e in r["entities"]] for r in many]


def test_predict_cli_texts_and_files(ner_merged, tmp_path, capsys):
    assert cli.main(["predict", str(ner_merged), "Emma flew to Paris", "nothing"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["text"] for r in rows] == ["Emma flew to Paris", "nothing"]
    assert all(isinstance(r["entities"], list) for r in rows)

    plain = tmp_path / "texts.txt"
    plain.write_text("Emma flew to Paris\n\nnothing\n", encoding="utf-8")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"id": 1, "text": "Emma flew to Paris"}\n{"id": 2, "text": "nothing"}\n', encoding="utf-8")
    assert read_inputs(plain) == read_inputs(jsonl) == ["Emma flew to Paris", "nothing"]
    result = tmp_path / "out.jsonl"
    assert cli.main(["predict", str(ner_merged), "--input", str(jsonl), "--output", str(result)]) == 0
    captured = capsys.readouterr()
    assert "predict" in captured.err  # progress bar / summary on stderr, nothing on stdout
    assert captured.out == ""
    assert [json.loads(line) for line in result.read_text().splitlines()] == rows


def test_predict_input_errors(ner_merged, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    assert cli.main(["predict", str(ner_merged), "--input", str(bad)]) == 2
    assert "bad.jsonl:1: expected an object with a string 'text'" in capsys.readouterr().err
    bad.write_text('{"question": "Who?", "context": "Ada."}\n{"question": "Who?"}\n', encoding="utf-8")
    with pytest.raises(PeftlabError, match=r"bad.jsonl:2: a question-answering input needs both 'question' and "
                                           r"'context' \(found question\)"):
        read_inputs(bad)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Emma flew to Paris\nCaf\xe9 in Rome\n".encode("latin-1"))
    assert cli.main(["predict", str(ner_merged), "--input", str(latin)]) == 2
    assert f"{latin}:2: not UTF-8 text (byte 0xe9); --input must be UTF-8" in capsys.readouterr().err
    assert cli.main(["predict", str(ner_merged)]) == 2
    with pytest.raises(PeftlabError, match="not a run folder, an exported package or a merged checkpoint"):
        load_predictor(tmp_path)


def test_predict_bad_arguments_and_damaged_runs_are_one_line(ner_run, ner_merged, tmp_path, capsys):
    import shutil

    cases = [
        (["--output", str(tmp_path)], f"--output: {tmp_path} is a folder; expected the path of a file to write"),
        (["--batch-size", "0", "--top-k", "3"], "--batch-size: expected a positive number"),
        (["--top-k", "0"], "--top-k: expected a positive number"),
    ]
    for extra, message in cases:
        assert cli.main(["predict", str(ner_merged), "hello", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not list(tmp_path.iterdir())  # nothing written into the folder given as --output

    bad_config = tmp_path / "bad-config"
    shutil.copytree(ner_merged, bad_config)
    (bad_config / "config.json").write_text("{not json", encoding="utf-8")
    damaged = tmp_path / "damaged-run"
    shutil.copytree(ner_run, damaged)
    adapter = next((damaged / "model").glob("*.safetensors"))
    adapter.write_bytes(adapter.read_bytes()[:-200])
    cut = tmp_path / "cut-merged"
    shutil.copytree(ner_merged, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-200])
    for folder, message in ((bad_config, f"{bad_config / 'config.json'}: cannot read it: "),
                            (damaged, f"{adapter}: not a complete safetensors file"),
                            (cut, f"{cut / 'model.safetensors'}: not a complete safetensors file")):
        assert cli.main(["predict", str(folder), "hello"]) == 2, folder
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_classification_predict_run_and_merged(tiny_bert, banking_small, tmp_path, capsys):
    run = tmp_path / "cls"
    peftlab.train(cls_recipe(tiny_bert, banking_small, run, {"name": "lora", "r": 4}, epochs=1, lr=1e-2))
    merged = tmp_path / "cls-merged"
    merge(run, merged, verify_examples=16, eval_split="none")
    texts = ["my card has not arrived yet", "what is the exchange rate", "top up failed", "how old do I need to be"]
    a, b = predict(run, texts), predict(merged, texts)
    labels = json.loads((run / "labels.json").read_text())
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["label"] in labels and 0 < ra["probability"] <= 1
        assert ra["probability"] == pytest.approx(rb["probability"], abs=1e-5)
    assert cli.main(["predict", str(merged), texts[0], "--top-k", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] == row["top"][0]["label"] and len(row["top"]) == 3
    assert row["top"][0]["probability"] >= row["top"][1]["probability"] >= row["top"][2]["probability"]
