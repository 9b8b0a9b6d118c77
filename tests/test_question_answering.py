"""task: question_answering on tiny models and a slice of SQuAD v1.1: SQuAD scoring on cases whose
scores are known, windows of long contexts (answers across a window boundary, windows without the
answer), the window-to-question map under length sorting, training with several methods, merge +
predict, and one-line errors for bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftlab
import peftlab.api
from conftest import run_cli
from peftlab.errors import PeftlabError
from peftlab.metrics import answer_f1, normalize_answer, squad_scores

def qa_recipe(backbone, files: dict, out: Path, method: dict, max_length: int = 96, stride: int = 32, **train) -> dict:
    t = {"lr": 5e-3, "epochs": 1, "batch_size": 16, "eval_batch_size": 16, "seed": 1, "trackers": "none",
         "num_threads": 1, **train}
    return {"backbone": {"name": str(backbone)}, "task": "question_answering",
            "task_options": {"doc_stride": stride, "max_answer_length": 30},
            "data": {**files, "max_length": max_length, "validation_split": 0.2},
            "method": method, "train": t, "output": {"dir": str(out)}}


def _task(recipe: dict):
    from peftlab.backbones import load_tokenizer
    from peftlab.recipe import recipe_from_dict
    from peftlab.tasks import get_task_class

    r = recipe_from_dict(recipe)
    return get_task_class("question_answering")(r), load_tokenizer(r.backbone)


# --------------------------------------------------------------------------------------- scoring


def test_squad_normalization_and_scores_on_known_cases():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    assert answer_f1("the cat sat", "cat sat on") == pytest.approx(0.8)  # P 1, R 2/3
    assert answer_f1("Denver Broncos", "broncos") == pytest.approx(2 / 3)
    assert answer_f1("", "x") == 0.0
    # max over references; exact match after normalization
    s = squad_scores(["Denver Broncos", "1990s", "nothing"], [["Broncos", "the Denver Broncos!"], ["1990"], ["x", "y"]])
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 / 3)
    s = squad_scores(["in the park", "cat"], [["park"], ["a cat", "dog"]])
    assert s == {"exact_match": 50.0, "f1": pytest.approx(100 * (2 / 3 + 1) / 2)}  # "in park" vs "park": P .5 R 1


# ---------------------------------------------------------------------------------------- windows


def test_long_contexts_are_windowed_and_targets_match_the_answer_text(tiny_bert, tmp_path, squad_small):
    task, tok = _task(qa_recipe(tiny_bert, squad_small, tmp_path / "r", {"name": "full"}, max_length=64, stride=16))
    splits = task.load_splits()
    enc = task.encode(splits.train, tok, "train")
    windows = enc.extra["windows"]
    assert len(enc) > len(splits.train)  # contexts longer than 64 tokens became several windows
    per_question: dict[int, list] = {}
    for feat in enc.features:
        q, offsets = windows[feat["_window"]]
        assert len(feat["input_ids"]) <= 64
        per_question.setdefault(q, []).append((feat, offsets))
    assert set(per_question) == set(range(len(splits.train)))
    crossing = exact = 0
    for q, wins in per_question.items():
        ex = splits.train[q]
        answer = ex["answers"][0]
        hits = []
        for feat, offsets in wins:
            s, e = feat["start_positions"], feat["end_positions"]
            if s == 0 and e == 0:  # [CLS]: this window does not hold the whole answer
                first = min(o[0] for o in offsets if o is not None)
                last = max(o[1] for o in offsets if o is not None)
                assert first > answer["answer_start"] or last < answer["answer_start"] + len(answer["text"])
                continue
            # the tightest token span holding the answer (a word piece cannot be split: "gold" in "golden")
            a_start, a_end = answer["answer_start"], answer["answer_start"] + len(answer["text"])
            assert offsets[s][0] <= a_start < offsets[s][1] and offsets[e][0] < a_end <= offsets[e][1], answer
            exact += ex["context"][offsets[s][0]:offsets[e][1]] == answer["text"]
            hits.append(s)
        assert hits, f"no window holds question {q}'s answer"
        # an answer across a window boundary: some window starts or ends inside it (and is targeted [CLS])
        if len(wins) > 1 and len(hits) < len(wins):
            crossing += 1
    assert crossing > 0
    assert exact > 0.95 * len(per_question)


def test_a_window_without_the_answer_targets_cls(tiny_bert, tmp_path):
    words = " ".join(f"w{i}" for i in range(200))
    context = words + " The answer is Paris."
    rows = [{"question": "Where?", "context": context,
             "answers": [{"text": "Paris", "answer_start": context.index("Paris")}]}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    task, tok = _task(qa_recipe(tiny_bert, {"train": str(path)}, tmp_path / "r", {"name": "full"}, max_length=48,
                                stride=8))
    enc = task.encode([{**r, "_where": "x"} for r in rows], tok, "train")
    targets = [(f["start_positions"], f["end_positions"]) for f in enc.features]
    assert len(targets) > 5
    paris = context.index("Paris")
    holding = 0
    for feat, (s, e) in zip(enc.features, targets):
        _, offsets = enc.extra["windows"][feat["_window"]]
        last = max(o[1] for o in offsets if o is not None)
        if last < paris + len("Paris"):
            assert (s, e) == (0, 0)  # the answer lies beyond this window
        else:
            assert context[offsets[s][0]:offsets[e][1]] == "Paris"
            holding += 1
    assert 1 <= holding <= 2  # the last window, and the one before if the stride's overlap holds it too


class OracleQA(torch.nn.Module):
    """start/end logits peaked at each window's training target, looked up by its input ids: a model
    that is right on every window it was given, whatever order the windows arrive in."""

    def __init__(self, features):
        super().__init__()
        self.table = {tuple(f["input_ids"]): (f["start_positions"], f["end_positions"]) for f in features}
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None):
        from types import SimpleNamespace

        start = torch.zeros(input_ids.shape)
        end = torch.zeros(input_ids.shape)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            s, e = self.table[tuple(i for i, m in zip(ids, mask) if m)]
            start[row, s] += 20.0
            end[row, e] += 20.0
        return SimpleNamespace(start_logits=start, end_logits=end, loss=None)


def test_evaluation_pairs_every_window_with_its_question_when_sorted_by_length(tiny_bert, tmp_path, squad_small):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    task, tok = _task(qa_recipe(tiny_bert, squad_small, tmp_path / "r", {"name": "full"}, max_length=64, stride=16))
    splits = task.load_splits()
    encoded = task.encode(splits.train, tok, "validation").sorted_by_length()
    assert [f["_window"] for f in encoded.features] != sorted(f["_window"] for f in encoded.features)
    accelerator = Accelerator(cpu=True)
    dl = accelerator.prepare(DataLoader(encoded, batch_size=7, collate_fn=task.collator(tok)))
    metrics = task.evaluate(OracleQA(encoded.features), dl, accelerator, encoded)
    assert metrics["examples"] == len(splits.train) and metrics["windows"] == len(encoded)
    assert metrics["exact_match"] > 95.0  # short of 100 only where a word piece is longer than the answer
    expected = {}
    for f in encoded.features:
        q, offsets = encoded.extra["windows"][f["_window"]]
        if f["start_positions"]:
            expected[q] = splits.train[q]["context"][offsets[f["start_positions"]][0]:offsets[f["end_positions"]][1]]
    logits, _ = task.window_logits(OracleQA(encoded.features), dl, accelerator)
    assert [a["answer"] for a in task.answers(encoded, logits)] == [expected[q] for q in range(len(splits.train))]
    # the same logits with the windows' questions shuffled would score far lower: the map matters
    by_length: dict[int, list[int]] = {}
    for f in encoded.features:
        by_length.setdefault(len(f["input_ids"]), []).append(f["_window"])
    rotated = {ws[i]: logits[ws[(i + 1) % len(ws)]] for ws in by_length.values() for i in range(len(ws))}
    wrong = task.answers(encoded, rotated)
    refs = [[a["text"] for a in ex["answers"]] for ex in splits.train]
    assert squad_scores([a["answer"] for a in wrong], refs)["exact_match"] < 50


def test_windows_compare_by_logits_not_by_probabilities_renormalised_over_the_context():
    """A window that points at [CLS] (it lacks the answer) and leans weakly to one context token must
    lose to a window that points at a span: over the context alone its guess would look as sure."""
    from peftlab.tasks.question_answering import best_span

    offsets = [None, None, (0, 5), (6, 9), (10, 14), None]  # [CLS] question [SEP]... context ... [SEP]
    leaning = torch.tensor([20.0, -10, 3, -10, -10, -10])
    cls_window = best_span(leaning, leaning, offsets, 30)
    answer_window = best_span(torch.tensor([0.0, 0, 0, 4, 0, 0]), torch.tensor([0.0, 0, 0, 0, 4, 0]), offsets, 30)
    assert (cls_window.start, cls_window.end) == (0, 5) and (answer_window.start, answer_window.end) == (6, 14)
    # softmaxes over the context alone would score these spans 1.00 and 0.93: the wrong window would win
    assert answer_window.logit > cls_window.logit  # 8 against 6
    assert cls_window.probability < 0.01 < answer_window.probability  # whole-window softmaxes
    assert best_span(torch.zeros(6), torch.zeros(6), [None] * 6, 30) is None
    too_long = best_span(torch.tensor([0.0, 0, 9, 0, 0, 0]), torch.tensor([0.0, 0, 0, 0, 9, 0]), offsets, 2)
    assert (too_long.start, too_long.end) != (0, 14)  # max_answer_length 2 tokens: not positions 2..4


def test_validation_is_held_out_by_whole_articles(tiny_bert, tmp_path, squad_small):
    task, _ = _task(qa_recipe(tiny_bert, squad_small, tmp_path / "r", {"name": "full"}))
    splits = task.load_splits()
    train_titles = {ex["title"] for ex in splits.train}
    dev_titles = {ex["title"] for ex in splits.validation}
    assert dev_titles and train_titles and not train_titles & dev_titles
    assert not {ex["context"] for ex in splits.train} & {ex["context"] for ex in splits.validation}
    assert any("whole articles" in n for n in splits.notes)


# --------------------------------------------------------------------------------------- training


METHODS = [({"name": "full"}, "none"), ({"name": "lora", "r": 4, "target_modules": "all-linear"}, "none"),
           ({"name": "adapter", "reduction_factor": 4}, "none"), ({"name": "head"}, "none"),
           ({"name": "prefix", "num_virtual_tokens": 4}, "none"), ({"name": "ia3"}, "none"),
           ({"name": "lora", "r": 4, "target_modules": "all-linear"}, "nf4")]


@pytest.mark.parametrize("method,quantization", METHODS, ids=[f"{m['name']}-{q}" for m, q in METHODS])
def test_methods_train_on_squad_and_report_exact_match_and_f1(tiny_bert, tmp_path, squad_small, method, quantization):
    recipe = qa_recipe(tiny_bert, squad_small, tmp_path / "run", method)
    recipe["backbone"]["quantization"] = quantization
    metrics = peftlab.train(recipe)
    for split in ("dev", "test"):
        assert {"exact_match", "f1", "loss", "windows"} <= set(metrics[split])
        assert 0.0 <= metrics[split]["exact_match"] <= metrics[split]["f1"] <= 100.0
    assert metrics["test"]["examples"] == sum(len(p["qas"]) for a in json.loads(Path(squad_small["test"]).read_text())["data"]
                                               for p in a["paragraphs"])


def test_lora_merges_and_predicts_the_same_answers_as_the_run(tiny_bert, tmp_path, squad_small):
    run = tmp_path / "run"
    peftlab.train(qa_recipe(tiny_bert, squad_small, run, {"name": "lora", "r": 4, "target_modules": "all-linear"},
                            epochs=2))
    merged = tmp_path / "merged"
    report = peftlab.merge(run, merged)
    assert report["passed"] and report["agreement"] == 1.0
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]
    doc = json.loads(Path(squad_small["test"]).read_text())
    items = [{"question": qa["question"], "context": p["context"]}
             for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]][:12]
    from_run = peftlab.api.predict(run, items, batch_size=5)
    from_merged = peftlab.api.predict(merged, items)
    assert [r["answer"] for r in from_run] == [r["answer"] for r in from_merged]
    for item, row in zip(items, from_run):
        assert item["context"][row["start"]:row["end"]] == row["answer"]
        assert 0.0 <= row["score"] <= 1.0
    # the CLI: --question/--context and a JSONL file
    res = run_cli("predict", str(merged), "--question", items[0]["question"], "--context", items[0]["context"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["answer"] == from_run[0]["answer"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps({"id": str(i), **it}) + "\n" for i, it in enumerate(items[:3])), encoding="utf-8")
    res = run_cli("predict", str(run), "--input", str(jsonl))
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["answer"] for line in res.stdout.splitlines()] == [r["answer"] for r in from_run[:3]]
    # benchmarks/merged_qa_answers.py: the merged side answered by transformers + torch alone, in its own process
    import subprocess
    import sys

    out = tmp_path / "answers.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merged_qa_answers.py"
    res = subprocess.run([sys.executable, str(script), str(run), str(merged), "--questions", "10", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["questions"] == 10 and result["same_answer_and_span"] == 10 and result["differences"] == []
    assert result["run_scores"] == result["merged_scores"]


def test_without_token_types_the_model_sees_type_0_and_its_merged_checkpoint_ignores_them(tiny_bert, tmp_path,
                                                                                          squad_small):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    recipe = qa_recipe(tiny_bert, squad_small, tmp_path / "run", {"name": "lora", "r": 4}, epochs=1)
    recipe["task_options"]["token_type_ids"] = False
    task, tok = _task(recipe)
    encoded = task.encode(task.load_splits().train[:5], tok, "train")
    assert all("token_type_ids" not in f for f in encoded.features)
    peftlab.train(recipe)
    merged = tmp_path / "merged"
    assert peftlab.merge(tmp_path / "run", merged)["passed"]
    model = AutoModelForQuestionAnswering.from_pretrained(str(merged)).eval()
    table = model.bert.embeddings.token_type_embeddings.weight
    assert torch.equal(table[1], table[0])
    doc = json.loads(Path(squad_small["test"]).read_text())
    qa = doc["data"][0]["paragraphs"][0]
    enc = AutoTokenizer.from_pretrained(str(merged))(qa["qas"][0]["question"], qa["context"], truncation="only_second",
                                                     max_length=96, return_tensors="pt")
    assert int(enc["token_type_ids"].max()) == 1  # a plain transformers user passes them
    with torch.no_grad():
        typed = model(**enc)
        untyped = model(**{k: v for k, v in enc.items() if k != "token_type_ids"})
    assert torch.equal(typed.start_logits, untyped.start_logits) and torch.equal(typed.end_logits, untyped.end_logits)


# ----------------------------------------------------------------------------------------- errors


def _bad(tiny_bert, tmp_path, rows, **opts):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = qa_recipe(tiny_bert, {"train": str(path), "validation": str(path)}, tmp_path / "r", {"name": "full"}, **opts)
    with pytest.raises(PeftlabError) as err:
        task, tok = _task(recipe)
        splits = task.load_splits()
        task.encode(splits.train, tok, "train")
    return str(err.value)


def test_bad_rows_get_one_line_errors(tiny_bert, tmp_path):
    ok = {"question": "Who?", "context": "Ada wrote it.", "answers": [{"text": "Ada", "answer_start": 0}]}
    msg = _bad(tiny_bert, tmp_path, [ok] * 5 + [{**ok, "answers": [{"text": "Ada", "answer_start": 4}]}])
    assert "bad.jsonl:6" in msg and "not at character 4" in msg and "\n" not in msg
    msg = _bad(tiny_bert, tmp_path, [ok] * 5 + [{**ok, "answers": []}])
    assert "bad.jsonl:6" in msg and "needs an answer" in msg
    msg = _bad(tiny_bert, tmp_path, [ok] * 5 + [{"question": "Who?", "answers": []}])
    assert "bad.jsonl:6" in msg and "'context'" in msg
    msg = _bad(tiny_bert, tmp_path, [ok] * 5 + [{"context": ok["context"], "answers": ok["answers"]}])
    assert "bad.jsonl:6: no key 'question'" in msg and msg.endswith("the recipe names it in task_options.question_column")
    msg = _bad(tiny_bert, tmp_path, [{**ok, "question": "why " * 80}] * 6)
    assert "the question has" in msg and "data.max_length" in msg
    squad = tmp_path / "bad.json"  # SQuAD's own layout: a question without its text names its place
    squad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": ok["context"], "qas": [
        {"id": "q1", "answers": ok["answers"]}]}]}]}), encoding="utf-8")
    with pytest.raises(PeftlabError, match=r"bad.json: data\[0\].paragraphs\[0\].qas\[0\]: expected an object with a 'question'"):
        _task(qa_recipe(tiny_bert, {"train": str(squad), "validation": str(squad)}, tmp_path / "r", {"name": "full"}))[0].load_splits()
    hub_style = {**ok, "answers": {"text": ["Ada"], "answer_start": [0]}}
    task, _ = _task(qa_recipe(tiny_bert, {"train": str(tmp_path / "bad.jsonl")}, tmp_path / "r", {"name": "full"}))
    assert task.answers_of({**hub_style, "_where": "x"}) == [{"text": "Ada", "answer_start": 0}]


def test_unknown_task_option_is_one_line(tiny_bert, tmp_path, squad_small):
    from peftlab.recipe import recipe_from_dict

    recipe = qa_recipe(tiny_bert, squad_small, tmp_path / "r", {"name": "full"})
    recipe["task_options"]["doc_strid"] = 3
    with pytest.raises(PeftlabError, match="task_options.doc_strid"):
        recipe_from_dict(recipe)
