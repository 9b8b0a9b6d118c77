"""peftlab merge / export: plain-transformers checkpoints, verification, refusals (tiny random BERT)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import peftlab
from conftest import cls_recipe, ner_recipe
from peftlab import cli
from peftlab.errors import PeftlabError, VerificationError
from peftlab.runs import load_run


merge_mod = importlib.import_module("peftlab.deploy.merge")  # the module (peftlab.deploy.merge is also the function)


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def lora_ner(tiny_bert, wnut_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge-runs") / "lora_ner"
    peftlab.train(ner_recipe(tiny_bert, wnut_small, out, {"name": "lora", "r": 4, "alpha": 8}, epochs=2, lr=1e-2))
    return out


@pytest.fixture(scope="module")
def merged_ner(lora_ner, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "lora_ner"
    assert cli.main(["merge", str(lora_ner), "--out", str(out)]) == 0
    return out


def test_merged_checkpoint_layout(merged_ner, lora_ner):
    files = {p.name for p in merged_ner.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "verify.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth")) or f.startswith("adapter_")]
    config = read(merged_ner / "config.json")
    labels = read(lora_ner / "labels.json")
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}
    assert config["architectures"] == ["BertForTokenClassification"]
    assert "quantization_config" not in config
    with safe_open(str(merged_ner / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not [k for k in keys if "lora" in k or "base_model" in k or "modules_to_save" in k]
    assert any(k.startswith("classifier.") for k in keys)


def test_verify_json_exact_merge(merged_ner, lora_ner):
    v = read(merged_ner / "verify.json")
    assert v["kind"] == "exact" and v["passed"] is True and v["method"] == "lora"
    assert v["examples"] == 48 and v["predictions"] > 48  # all 48 dev sentences, one prediction per word
    assert v["max_abs_logit_diff"] <= 1e-4 and v["agreement"] == 1.0
    assert v["thresholds"]["max_abs_logit_diff"] == 1e-4 and v["thresholds"]["min_agreement"] == 1.0
    m = v["metrics"]
    assert m["metric"] == "f1" and m["split"] == "validation"
    assert m["unmerged"]["f1"] == pytest.approx(read(lora_ner / "metrics.json")["dev"]["f1"], abs=1e-9)
    assert m["merged"]["f1"] == m["unmerged"]["f1"]
    assert v["params"]["merged"] == read(lora_ner / "params.json")["total_params"]


def test_saved_files_take_their_mode_from_the_umask(tiny_bert, wnut_small, tmp_path):
    """safetensors creates its files 0600; every file peftlab leaves (weights included) is readable
    as the umask allows, like any other file the user writes."""
    import os

    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        peftlab.train(ner_recipe(tiny_bert, wnut_small, run, {"name": "lora", "r": 2}, max_steps=2))
        assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    files = [p for p in [*run.rglob("*"), *(tmp_path / "merged").rglob("*")] if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "adapter_model.safetensors" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert {m for m in modes.values()} == {"0o640"}, modes
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "- source run: `../run` (relative to this folder)" in card  # (the recipe itself is quoted as written)


def test_model_card(merged_ner, tiny_bert):
    card = (merged_ner / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: token-classification\n")
    v = read(merged_ner / "verify.json")
    for needle in (str(tiny_bert), "method: `lora` r=4", "## Data", "## Metrics of the run", "## Recipe",
                   "## Parameters", "| max abs logit diff |", f"{100 * v['agreement']:.2f}%", "wnut", "| test |"):
        assert needle in card, needle


PLAIN_LOAD = r"""
import json, sys
from transformers import AutoModelForTokenClassification, pipeline
model = AutoModelForTokenClassification.from_pretrained(sys.argv[1])
ner = pipeline("token-classification", model=sys.argv[1], aggregation_strategy="simple")
out = ner(["Heading to New York with Emma tomorrow", "nothing here"])
assert "peft" not in sys.modules and "peftlab" not in sys.modules, "imported peft/peftlab"
print(json.dumps({"labels": model.config.num_labels, "n": len(out)}))
"""


def test_plain_transformers_loads_and_pipeline_runs_without_peft(merged_ner, lora_ner):
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged_ner)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"labels": len(read(lora_ner / "labels.json")), "n": 2}


def test_test_f1_of_merged_equals_unmerged(merged_ner, lora_ner):
    """Entity F1 on the test split, peftlab's evaluator, merged (plain transformers) vs the run."""
    from transformers import AutoModelForTokenClassification

    run = load_run(lora_ner)
    test_rows = run.task.load_splits().test
    unmerged = merge_mod.task_metrics(run.model, run.task, run.tokenizer, test_rows)
    merged_model = AutoModelForTokenClassification.from_pretrained(str(merged_ner))
    merged = merge_mod.task_metrics(merged_model, run.task, run.tokenizer, test_rows)
    assert unmerged["f1"] == pytest.approx(read(lora_ner / "metrics.json")["test"]["f1"], abs=1e-9)
    assert merged["f1"] == unmerged["f1"] and merged["accuracy"] == unmerged["accuracy"]
    assert merged["loss"] == pytest.approx(unmerged["loss"], abs=1e-5)


def _change_before_save(monkeypatch, change):
    """``change`` edits the merged model right before it is saved (and verified)."""
    real = merge_mod._merged_model

    def merged_model(*args):
        model = real(*args)
        change(model)
        return model

    monkeypatch.setattr(merge_mod, "_merged_model", merged_model)


def test_corrupted_merged_weight_fails_verification_and_writes_nothing(lora_ner, tmp_path, monkeypatch, capsys):
    def corrupt(model):
        with torch.no_grad():
            w = model.bert.encoder.layer[0].attention.self.query.weight
            w.add_(0.5 * torch.randn_like(w))

    _change_before_save(monkeypatch, corrupt)
    out = tmp_path / "merged"
    code = cli.main(["merge", str(lora_ner), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == VerificationError.exit_code == 4
    assert "verification failed" in err and "max |Δlogit|" in err and "nothing was written" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_tolerance_is_enforced_even_when_predictions_agree(lora_ner, tmp_path, monkeypatch):
    def nudge(model):
        with torch.no_grad():
            model.classifier.bias.add_(1e-3)  # shifts every logit by 1e-3, argmax unchanged

    _change_before_save(monkeypatch, nudge)
    with pytest.raises(VerificationError, match=r"max \|Δlogit\| 0.001 > tolerance 0.0001") as info:
        merge_mod.merge(lora_ner, tmp_path / "m", eval_split="none")
    assert "prediction agreement" not in str(info.value)
    assert not (tmp_path / "m").exists()
    report = merge_mod.merge(lora_ner, tmp_path / "m", eval_split="none", atol=2e-3)  # explicit, looser
    assert report["passed"] and report["thresholds"]["max_abs_logit_diff"] == 2e-3
    assert "metrics" not in report


def test_existing_output_is_refused_unless_overwrite(lora_ner, merged_ner, tmp_path):
    with pytest.raises(PeftlabError, match="already holds files; pass --overwrite"):
        merge_mod.merge(lora_ner, merged_ner)
    with pytest.raises(PeftlabError, match="inside the run folder"):
        merge_mod.merge(lora_ner, lora_ner / "merged")
    with pytest.raises(PeftlabError, match="not a finished peftlab run"):
        merge_mod.merge(tmp_path, tmp_path / "x")


def test_bfloat16_merge_is_a_dtype_change(lora_ner, tmp_path):
    out = tmp_path / "bf16"
    report = merge_mod.merge(lora_ner, out, dtype="bfloat16", eval_split="none")
    assert report["kind"] == "dtype_change" and report["dtype"] == "bfloat16"
    assert report["thresholds"]["max_abs_logit_diff"] == 0.5 and report["thresholds"]["min_agreement"] == 0.99
    assert 0 < report["max_abs_logit_diff"] <= 0.5
    assert read(out / "config.json")["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("classifier.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("method", [
    {"name": "full"},
    {"name": "head", "unfreeze_last_layers": 1},
    {"name": "lora", "r": 4, "use_dora": True},
    {"name": "ia3"},
])
def test_merge_other_methods_classification(tiny_bert, banking_small, tmp_path, method):
    from transformers import AutoModelForSequenceClassification, pipeline

    run = tmp_path / "run"
    peftlab.train(cls_recipe(tiny_bert, banking_small, run, method, epochs=2, lr=5e-3))
    out = tmp_path / "merged"
    report = merge_mod.merge(run, out, verify_examples=24)
    assert report["kind"] == "exact" and report["passed"] and report["agreement"] == 1.0
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["metrics"]["merged"]["accuracy"] == report["metrics"]["unmerged"]["accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    labels = json.loads((run / "labels.json").read_text())
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.architectures == ["BertForSequenceClassification"]
    assert report["params"]["merged"] == sum(p.numel() for p in model.parameters())
    top = pipeline("text-classification", model=str(out))("my card has not arrived")[0]
    assert top["label"] in labels
    assert read(out / "peftlab_merge.json")["recipe"]["method"]["name"] == method["name"]


def _fake_run(folder: Path, tiny_bert: Path, files: dict, method: dict) -> Path:
    import yaml

    folder.mkdir(parents=True)
    (folder / "model").mkdir()
    recipe = ner_recipe(tiny_bert, files, folder, method)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return folder


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_unmergeable_methods_are_refused_naming_those_that_can(tiny_bert, wnut_small, tmp_path, capsys, method):
    run = _fake_run(tmp_path / "run", tiny_bert, wnut_small, {"name": method})
    out = tmp_path / "merged"
    assert cli.main(["merge", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"recipe.yaml: method.name: method '{method}' cannot be merged" in err
    mergeable = [n for n, c in peftlab.available_methods().items() if c.can_merge]
    assert {"full", "head", "lora"} <= set(mergeable)
    assert f"(methods that can: {', '.join(mergeable)})" in err and "peftlab export" in err
    assert not out.exists()


def test_export_adapter_run_and_predict_from_it(tiny_bert, wnut_small, tmp_path, capsys):
    from peftlab.predict import predict

    run = tmp_path / "adapter_run"
    peftlab.train(ner_recipe(tiny_bert, wnut_small, run, {"name": "adapter"}, epochs=2, lr=1e-2))
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(out), "--verify-examples", "16"]) == 0
    assert "exported:" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"model", "recipe.yaml", "labels.json", "peftlab_export.json", "verify.json", "README.md"} <= files
    assert not {"checkpoints", "train.log", "logs"} & files
    info = read(out / "peftlab_export.json")
    assert info["method"] == "adapter" and info["can_merge"] is False
    assert info["base"]["name"] == str(tiny_bert) and info["base"]["resolved_at_export"] == str(tiny_bert)
    v = read(out / "verify.json")
    assert v["passed"] and v["max_abs_logit_diff"] == 0.0 and v["agreement"] == 1.0
    assert not [p for p in (out / "model").iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    texts = ["Emma flew to Paris with @jo", "nothing here"]
    assert predict(out, texts) == predict(run, texts)
    assert "cannot be merged into the backbone's weights" in (out / "README.md").read_text()


def test_merge_nf4_qlora_reports_the_gap(tiny_bert, wnut_small, tmp_path):
    run = tmp_path / "qlora"
    recipe = ner_recipe(tiny_bert, wnut_small, run, {"name": "lora", "r": 4, "alpha": 8}, epochs=2, lr=1e-2)
    recipe["backbone"]["quantization"] = "nf4"
    peftlab.train(recipe)
    for mode in ("reload", None):  # None: the default, dequantize
        out = tmp_path / f"merged-{mode}"
        options = {"quantized_base": mode} if mode else {}
        report = merge_mod.merge(run, out, verify_examples=48, **options)
        kind, agreement = ("from_quantized", 0.9) if mode == "reload" else ("dequantized", 0.99)
        assert report["kind"] == kind and report["quantization"] == "nf4"
        assert report["quantized_base"] == (mode or "dequantize") and report["passed"]
        assert report["thresholds"]["max_abs_logit_diff"] is None and report["thresholds"]["min_agreement"] == agreement
        m = report["metrics"]
        assert m["split"] == "validation" and {"f1", "loss"} <= set(m["unmerged"]) and {"f1", "loss"} <= set(m["merged"])
        assert m["delta"] == pytest.approx(m["merged"]["f1"] - m["unmerged"]["f1"])
        assert m["unmerged"]["f1"] == pytest.approx(read(run / "metrics.json")["dev"]["f1"], abs=1e-9)
        config = read(out / "config.json")
        assert "quantization_config" not in config and config["dtype"] == "float32"
        card = (out / "README.md").read_text()
        assert "trained on a **nf4** quantized backbone" in card and "| unmerged (as trained) |" in card
        assert f"{report['max_abs_logit_diff']:.4f}" in card or f"{report['max_abs_logit_diff']:.4g}" in card
        assert read(out / "verify.json") == json.loads(json.dumps(report))
        if mode == "reload":
            gap_reload = report["max_abs_logit_diff"]
        else:
            # dequantized weights are what the adapter was trained on: a much smaller gap than a reload
            assert report["max_abs_logit_diff"] < gap_reload
            assert report["max_abs_logit_diff"] < 1e-3


def test_merge_int8_lora(tiny_bert, banking_small, tmp_path):
    run = tmp_path / "int8"
    recipe = cls_recipe(tiny_bert, banking_small, run, {"name": "lora", "r": 4}, epochs=1, lr=1e-2)
    recipe["backbone"]["quantization"] = "int8"
    peftlab.train(recipe)
    report = merge_mod.merge(run, tmp_path / "m", quantized_base="dequantize", verify_examples=24)
    assert report["kind"] == "dequantized" and report["quantization"] == "int8" and report["passed"]
    assert report["metrics"]["metric"] == "accuracy" and "accuracy" in report["metrics"]["merged"]
    assert report["agreement"] >= 0.9 and report["max_abs_logit_diff"] < 0.5
