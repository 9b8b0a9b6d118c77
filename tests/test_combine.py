"""merge --combine: LoRA runs combined by peft's add_weighted_adapter, merged and verified per source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import ner_recipe, write_conll
from peftlab import cli
from peftlab.deploy import combine
from peftlab.deploy.combine import HOWS
from peftlab.errors import PeftlabError, VerificationError
from peftlab.predict import predict


KEYWORDS = {"fruit": "apple", "water": "river", "music": "guitar", "space": "planet"}
FILLER = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()


def keyword_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Filler words (O) around one keyword tagged with its type: a task a tiny random model learns."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = list(KEYWORDS)[i % len(KEYWORDS)]
        words = [(w, "O") for w in rng.choices(FILLER, k=rng.randint(4, 9))]
        words.insert(rng.randrange(len(words) + 1), (KEYWORDS[kind], f"B-{kind}"))
        out.append(words)
    return out


@pytest.fixture(scope="module")
def lora_runs(tiny_bert, tmp_path_factory) -> list[Path]:
    """Two LoRA NER runs (different seeds) and a head-only run of a keyword task, on one tiny backbone."""
    root = tmp_path_factory.mktemp("combine-runs")
    files = {split: str(write_conll(root / f"{split}.conll", keyword_sentences(n, seed)))
             for split, n, seed in (("train", 160, 0), ("validation", 40, 1), ("test", 40, 2))}
    runs = []
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    for name, method, seed in (("a", lora, 1), ("b", lora, 2), ("head", {"name": "head"}, 1)):
        runs.append(root / name)
        peftlab.train(ner_recipe(tiny_bert, files, runs[-1], method, epochs=15, lr=1e-2, head_lr=3e-2, seed=seed))
    # two runs that cannot be combined with the others: rank 8, and a label set without "space"
    runs.append(root / "r8")
    peftlab.train(ner_recipe(tiny_bert, files, runs[-1], {**lora, "r": 8}, epochs=1))
    no_space = {k: str(write_conll(root / f"ns-{k}.conll", [s for s in keyword_sentences(n, seed)
                                                               if not any(t == "B-space" for _, t in s)]))
                for k, n, seed in (("train", 80, 0), ("validation", 20, 1), ("test", 20, 2))}
    runs.append(root / "labels")
    peftlab.train(ner_recipe(tiny_bert, no_space, runs[-1], lora, epochs=1))
    return runs


def peft_reference(runs: list[Path], how: str, weights: list[float], tmp: Path) -> dict:
    """The same combination made with peft alone: each adapter loaded by peft (its config without the
    task head, which peft's add_weighted_adapter refuses to share), combined, merged."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    base = AutoModelForTokenClassification.from_pretrained(json.loads((runs[0] / "model" / "adapter_config.json")
                                                           .read_text())["base_model_name_or_path"], num_labels=5)
    model = None
    for i, run in enumerate(runs):
        folder = tmp / f"adapter{i}"
        shutil.copytree(run / "model", folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None, "task_type": None,
                                                                  "target_modules": [t for t in config["target_modules"] if t != "classifier"]}))
        if model is None:
            model = PeftModel.from_pretrained(base, str(folder), adapter_name="s0")
        else:
            model.load_adapter(str(folder), adapter_name=f"s{i}")
    torch.manual_seed(0)
    model.add_weighted_adapter([f"s{i}" for i in range(len(runs))], weights, "c", combination_type=how, density=0.5)
    model.set_adapter("c")
    return {k: v for k, v in model.merge_and_unload().state_dict().items() if not k.startswith("classifier")}


@pytest.mark.parametrize("how", HOWS)
def test_combination_is_peft_own_and_the_head_is_the_weighted_mean(lora_runs, how, tmp_path):
    runs, weights = lora_runs[:2], [0.7, 0.3]
    report = combine(runs, tmp_path / how, how=how, weights=weights, accept_loss=True)
    assert report["max_abs_logit_diff"] <= 1e-4 and report["agreement"] == 1.0
    assert [s["run"] for s in report["sources"]] == [str(r.resolve()) for r in runs]
    written = load_file(str(tmp_path / how / "model.safetensors"))
    for key, value in peft_reference(runs, how, weights, tmp_path / "ref").items():
        assert torch.allclose(written[key], value, atol=1e-6), key
    heads = [load_file(str(r / "model" / "adapter_model.safetensors")) for r in runs]
    for name in ("weight", "bias"):
        expected = sum(h[f"base_model.model.classifier.{name}"] * w for h, w in zip(heads, weights))
        assert torch.allclose(written[f"classifier.{name}"], expected, atol=1e-6)
    saved = json.loads((tmp_path / how / "verify.json").read_text())
    assert saved["how"] == how and saved["weights"] == weights
    assert "combined" in (tmp_path / how / "README.md").read_text()


def test_a_wrong_combination_is_caught_and_not_written(lora_runs, tmp_path):
    runs = lora_runs[:2]
    sane = combine(runs, tmp_path / "sane", how="cat")
    for s in sane["sources"]:  # the runs learned something a broken combination loses
        assert s["source"]["f1"] >= 0.8 and s["fraction"] >= 0.9, s
    with pytest.raises(VerificationError, match="combined vs"):
        combine(runs, tmp_path / "broken", how="linear", weights=[60.0, 60.0])
    assert not (tmp_path / "broken").exists()
    assert cli.main(["merge", "--combine", *map(str, runs), "--weights", "60", "60", "--out", str(tmp_path / "broken")]) == 4
    assert not (tmp_path / "broken").exists()
    report = combine(runs, tmp_path / "accepted", how="linear", weights=[60.0, 60.0], accept_loss=True)
    assert report["passed"] is False and report["accepted_loss"] is True


def test_combined_checkpoint_predicts(lora_runs, tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["merge", "--combine", *map(str, lora_runs[:2]), "--how", "cat", "--out", str(out)]) == 0
    assert "combined:" in capsys.readouterr().out
    rows = predict(out, ["it was a planet of the", "he has the guitar"])
    assert [[(e["text"], e["type"]) for e in r["entities"]] for r in rows] == [[("planet", "space")], [("guitar", "music")]]


def test_combine_refuses_what_it_cannot_combine_in_one_line(lora_runs, tmp_path, capsys):
    a, b, head, r8, labels = lora_runs
    cases = [
        (["--combine", str(a), str(r8)], "peft cannot combine these adapters"),
        (["--combine", str(a), str(labels)], "its labels differ"),
        (["--combine", str(a)], "expected two or more LoRA runs"),
        (["--combine", str(a), str(head)], "method head; --combine takes LoRA runs"),
        (["--combine", str(a), str(b), "--weights", "1"], "--weights: expected 2 positive numbers"),
        (["--combine", str(a), str(b), "--density", "0"], "--density"),
        (["--combine", str(a), str(b), "--verify-examples", "0"], "--verify-examples"),
        (["--combine", str(a), str(b), "--min-fraction", "2"], "--min-fraction"),
        ([str(a), "--combine", str(a), str(b)], "give the runs to combine after --combine only"),
    ]
    for args, message in cases:
        assert cli.main(["merge", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("peftlab: error")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (args, err)
    assert not (tmp_path / "x").exists()
    with pytest.raises(PeftlabError, match="not one of"):
        combine([a, b], tmp_path / "y", how="average")
