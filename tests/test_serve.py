"""Several adapters on one base in one process, and ``peftlab serve`` over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import peftlab
from conftest import ROOT, cls_recipe, free_port, read_sentences
from peftlab.adapters import adapter_names, load_adapters
from peftlab.errors import PeftlabError
from peftlab.predict import load_predictor, predict

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "houlsby": {"name": "adapter", "placement": "houlsby", "reduction_factor": 4},
    "prefix": {"name": "prefix", "num_virtual_tokens": 4},
    "ia3": {"name": "ia3"},
    "loha": {"name": "loha", "r": 4},
    "head": {"name": "head"},
    "full": {"name": "full"},
}
TEXTS = ["how do I top up my card", "my card has not arrived yet", "what is the exchange rate", "pin blocked"]


@pytest.fixture(scope="module")
def cls_runs(tiny_bert, banking_small, tmp_path_factory) -> dict[str, Path]:
    """One short intent run per method on the same tiny backbone."""
    root = tmp_path_factory.mktemp("serve-runs")
    runs = {}
    for name, method in METHODS.items():
        runs[name] = root / name
        peftlab.train(cls_recipe(tiny_bert, banking_small, runs[name], method, epochs=1, lr=5e-3))
    return runs


def test_every_method_predicts_as_alone_and_the_frozen_base_is_held_once(cls_runs, ner_run):
    alone = {name: predict(path, TEXTS) for name, path in cls_runs.items()}
    adapters = load_adapters([f"{n}={p}" for n, p in cls_runs.items()] + [f"ner={ner_run}"])
    for name in cls_runs:
        assert adapters.predict(name, TEXTS) == alone[name], name
    assert adapters.predict("ner", TEXTS) == predict(ner_run, TEXTS)
    mixed = [(name, text) for text in TEXTS for name in ("lora", "ner", "prefix")]
    assert adapters.mixer is None and not any(a["mixed_batches"] for a in adapters.describe())  # by default
    _same(adapters.predict_mixed(mixed), [adapters.predict(name, [text])[0] for name, text in mixed])
    # the word embeddings of every method that froze them are one tensor; the full fine-tune's are its own
    ptrs = {n: next(p.data_ptr() for k, p in adapters.get(n).model.named_parameters() if "word_embeddings" in k)
            for n in adapters.names()}
    frozen = [n for n in adapters.names() if n != "full"]
    assert len({ptrs[n] for n in frozen}) == 1
    assert ptrs["full"] != ptrs["lora"]
    emb = load_predictor(cls_runs["lora"]).model.get_input_embeddings()
    emb_bytes = emb.weight.numel() * emb.weight.element_size()
    assert adapters.shared_bytes >= (len(frozen) - 1) * emb_bytes


def test_adapter_names_are_checked(tmp_path):
    assert adapter_names(["a=x/y", str(tmp_path)]) == [("a", Path("x/y")), (tmp_path.name, tmp_path)]
    for bad, msg in ((["a=x", "a=y"], "two adapters are named 'a'"), ([], "no adapters given"),
                     (["bad name=x"], "adapter name")):
        with pytest.raises(PeftlabError, match=msg):
            adapter_names(bad)
    with pytest.raises(PeftlabError, match="no such folder"):
        load_adapters([str(tmp_path / "missing")])


def _call(port: int, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def qa_run(tiny_bert, squad_small, tmp_path_factory) -> Path:
    from test_question_answering import qa_recipe

    out = tmp_path_factory.mktemp("serve-qa") / "qa"
    peftlab.train(qa_recipe(tiny_bert, squad_small, out, {"name": "lora", "r": 4}))
    return out


@pytest.fixture(scope="module")
def crf_run(tiny_bert, wnut_small, tmp_path_factory) -> Path:
    from conftest import ner_recipe

    out = tmp_path_factory.mktemp("serve-crf") / "crf"
    recipe = ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4, "alpha": 8}, epochs=2, lr=1e-2)
    peftlab.train({**recipe, "task_options": {"head": "crf"}})
    return out


def qa_items(squad_small: dict, n: int) -> list[dict]:
    doc = json.loads(Path(squad_small["test"]).read_text())
    return [{"question": qa["question"], "context": p["context"]}
            for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]][:n]


@pytest.fixture(scope="module")
def server(cls_runs, ner_run, qa_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "serve", f"ner={ner_run}",
                             f"intents={cls_runs['lora']}", f"qa={qa_run}", "--port", str(port), "--max-batch", "8",
                             "--max-length", "2000", "--max-request-bytes", "20000", "--shared-pass"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if _call(port, "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_answers_concurrent_requests_like_predict(server, cls_runs, ner_run, qa_run, wnut_small, squad_small):
    port, proc = server
    sentences, questions = read_sentences(wnut_small["test"], 24), qa_items(squad_small, 24)
    inputs = {"ner": sentences, "intents": sentences, "qa": questions}
    expected = {"ner": predict(ner_run, sentences), "intents": predict(cls_runs["lora"], sentences),
                "qa": predict(qa_run, questions)}
    assert any(row["entities"] for row in expected["ner"])  # the NER run tags something
    good = [(name, i) for name in expected for i in range(0, 24, 3)]
    bad = [
        ("/v1/nobody/predict", {"texts": ["x"]}, 404, "not loaded"),
        ("/v1/ner/predict", {"texts": ["   "]}, 400, "texts[0]: expected a non-empty string"),
        ("/v1/ner/predict", {"texts": ["a" * 2001]}, 413, "longer than 2000 characters"),
        ("/v1/ner/predict", {"texts": ["a"] * 9}, 413, "at most 8 per request"),
        ("/v1/ner/predict", {"questions": [{"question": "q", "context": "c"}]}, 400, "takes 'texts'"),
        ("/v1/intents/predict", b"{not json", 400, "not valid JSON"),
        ("/v1/intents/predict", b"x" * 30000, 413, "larger than 20000 bytes"),
        ("/v1/intents/predict", {"texts": "one string"}, 400, "expected a non-empty list"),
        ("/v1/intents/predict", b"[" * 15000, 400, "nested too deeply"),
        ("/v1/qa/predict", {"texts": ["who?"]}, 400, "takes 'questions'"),
        ("/v1/qa/predict", {"questions": [{"question": "who?"}]}, 400, "questions[0].context"),
    ]
    results: dict = {}

    def send(key, path, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        results[key] = _call(port, path, data)

    def body(name, i):
        return {"questions" if name == "qa" else "texts": inputs[name][i:i + 3]}

    threads = [threading.Thread(target=send, args=((name, i), f"/v1/{name}/predict", body(name, i))) for name, i in good]
    threads += [threading.Thread(target=send, args=(("bad", n), path, body)) for n, (path, body, _, _) in enumerate(bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for name, i in good:
        status, body = results[(name, i)]
        assert status == 200 and body["adapter"] == name, body
        _same(body["predictions"], expected[name][i:i + 3])  # LoRA rows share passes: float noise only
    for n, (_, _, status, message) in enumerate(bad):
        got, body = results[("bad", n)]
        assert got == status and message in body["error"] and "\n" not in body["error"], (n, got, body)
    assert _call(port, "/health") == (200, {"status": "ok", "adapters": 3})
    status, listing = _call(port, "/v1/adapters")
    assert status == 200 and [a["name"] for a in listing["adapters"]] == ["ner", "intents", "qa"]
    assert listing["shared_bytes"] > 0 and all(a["mixed_batches"] for a in listing["adapters"])
    assert _call(port, "/openapi.json")[0] == 200
    assert proc.poll() is None


def _same(got, expected, where="") -> None:
    """Equal rows, scores and probabilities within float noise (padding to another length)."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    elif isinstance(expected, dict):
        assert set(got) == set(expected), where
        for k in expected:
            _same(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for n, (a, b) in enumerate(zip(got, expected)):
            _same(a, b, f"{where}[{n}]")
    else:
        assert got == expected, where


def test_lora_adapters_of_three_tasks_share_one_forward_pass(cls_runs, ner_run, qa_run, crf_run, wnut_small,
                                                             squad_small):
    import random

    import torch

    sentences, questions = read_sentences(wnut_small["test"], 6), qa_items(squad_small, 4)
    paths = {"ner": ner_run, "intents": cls_runs["lora"], "qa": qa_run, "houlsby": cls_runs["houlsby"], "crf": crf_run}
    adapters = load_adapters([f"{n}={p}" for n, p in paths.items()], shared_pass=True)
    assert [a["mixed_batches"] for a in adapters.describe()] == [True, True, True, False, True]
    requests = [(n, s) for n in ("ner", "intents", "houlsby", "crf") for s in sentences] + [("qa", q) for q in questions]
    random.Random(0).shuffle(requests)
    calls: list = []
    adapters.mixer.trunk.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(list(kwargs["adapter_names"])), with_kwargs=True)
    got = adapters.predict_mixed(requests, batch_size=128)
    assert len(calls) == 1 and len(set(calls[0])) == 4  # one pass over the backbone for NER, CRF, intents, QA rows
    alone = {n: dict(zip(map(json.dumps, [i for m, i in requests if m == n]),
                         predict(paths[n], [i for m, i in requests if m == n]))) for n in paths}
    _same(got, [alone[n][json.dumps(i)] for n, i in requests])
    assert any(row.get("entities") for row in got)
    # each run's LoRA weights take part: its rows through its adapter differ from the bare backbone's
    enc = adapters.get("intents").tokenizer(sentences, padding=True, return_tensors="pt")
    for name in ("ner", "intents", "qa", "crf"):
        adapter = adapters.mixer.members[name][0]
        with torch.no_grad():
            own, bare = (adapters.mixer.trunk(**enc, adapter_names=[a] * len(sentences)).last_hidden_state
                         for a in (adapter, "__base__"))
        assert (own - bare).abs().max() > 1e-3, name


def test_serve_refuses_bad_arguments_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "peftlab.cli", "serve", str(tmp_path / "none"), "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["peftlab: error: --port: expected a positive number"]
    res = subprocess.run([sys.executable, "-m", "peftlab.cli", "serve", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no such folder" in res.stderr and "Traceback" not in res.stderr
