"""Security: safetensors only (pickle weights refused unless backbone.allow_pickle: true, and never
loaded when safetensors exist), trust_remote_code only from the recipe, recipes cannot name Python
objects to import or construct."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transformers
from conftest import ROOT, ner_recipe
from peftlab.backbones import load_model, load_tokenizer, resolve_backbone
from peftlab.errors import PeftlabError
from peftlab.recipe import BackboneConfig, load_recipe, recipe_from_dict

AUTO = "AutoModelForTokenClassification"
KW = {"num_labels": 3}


class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded (and code ran)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trapped_folder(tiny_bert: Path, folder: Path, keep_safetensors: bool) -> Path:
    folder.mkdir()
    for f in tiny_bert.iterdir():
        if f.is_file() and (keep_safetensors or not f.name.endswith(".safetensors")):
            shutil.copy(f, folder / f.name)
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weights": _Trap(folder.parent / "PICKLE_WAS_LOADED")}, fh)
    return folder


def test_pickle_only_backbone_is_refused_by_default(tiny_bert, tmp_path):
    folder = trapped_folder(tiny_bert, tmp_path / "bert", keep_safetensors=False)
    with pytest.raises(PeftlabError, match=r"holds only pickle weights \(pytorch_model.bin\).*backbone.allow_pickle: true"):
        resolve_backbone(BackboneConfig(name=str(folder)))
    with pytest.raises(PeftlabError, match="pickle"):
        load_model(BackboneConfig(name=str(folder)), AUTO, KW)
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists()


def test_pickle_next_to_safetensors_is_never_loaded(tiny_bert, tmp_path):
    folder = trapped_folder(tiny_bert, tmp_path / "bert", keep_safetensors=True)
    model = load_model(BackboneConfig(name=str(folder)), AUTO, KW)
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists()
    expected = load_file(str(tiny_bert / "model.safetensors"))
    got = model.bert.state_dict()
    for k in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        assert torch.equal(got[k], expected[k])


def test_allow_pickle_loads_a_trusted_pickle_backbone(tiny_bert, pickle_bert):
    assert not list(pickle_bert.glob("*.safetensors")) and (pickle_bert / "pytorch_model.bin").is_file()
    with pytest.raises(PeftlabError, match="holds only pickle weights"):
        load_model(BackboneConfig(name=str(pickle_bert)), AUTO, KW)
    model = load_model(BackboneConfig(name=str(pickle_bert), allow_pickle=True), AUTO, KW)
    expected = load_file(str(tiny_bert / "model.safetensors"))
    got = model.bert.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected if k in got)
    assert sum(k in got for k in expected) >= len(expected) - 2  # all but pooler-less extras


def test_trust_remote_code_is_false_unless_the_recipe_sets_it(tiny_bert, wnut_small, tmp_path, monkeypatch):
    from peftlab.runs import build_model
    from peftlab.tasks import get_task_class

    calls = []

    def spy(cls_name):
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            calls.append((cls_name, kwargs.get("trust_remote_code", "<absent>")))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    spy("AutoTokenizer")
    spy(AUTO)
    for trust in (None, True):
        calls.clear()
        data = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 4})
        if trust:
            data["backbone"]["trust_remote_code"] = True
        recipe = recipe_from_dict(data)
        task = get_task_class(recipe.task)(recipe)
        task.load_splits()
        tok = load_tokenizer(recipe.backbone)
        build_model(recipe, task, tok)
        assert {c for c, _ in calls} == {"AutoTokenizer", AUTO}
        assert all(v is bool(trust) for _, v in calls), calls


def test_no_source_hard_codes_trust_remote_code_or_loads_pickle():
    for path in sorted((ROOT / "peftlab").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        assert not re.search(r"trust_remote_code\s*=\s*True", text), rel
        assert not re.search(r"\b(torch\.load|pickle\.loads?|cPickle|dill)\s*\(", text), rel
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, rel


def test_recipes_cannot_name_python_objects(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    base = "backbone: {name: x}\ntask: token_classification\ndata: {train: t.conll}\n"
    cases = {
        "method: {name: os.system}\n": "method.name: unknown method 'os.system'",
        "method: {name: 'peftlab.methods.lora:LoRAMethod'}\n": "method.name: unknown method 'peftlab.methods.lora:LoRAMethod'",
        "method: {name: lora}\n": None,
    }
    for method, fragment in cases.items():
        path = tmp_path / "r.yaml"
        path.write_text(base + method)
        if fragment is None:
            assert load_recipe(path).method.name == "lora"
        else:
            with pytest.raises(PeftlabError, match=re.escape(fragment)):
                load_recipe(path)
    path.write_text(base.replace("task: token_classification", "task: builtins.eval") + "method: lora\n")
    with pytest.raises(PeftlabError, match=r"r.yaml:2: task: unknown task 'builtins.eval'"):
        load_recipe(path)
    marker = tmp_path / "YAML_RAN_CODE"
    path.write_text(base + f"method: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(PeftlabError, match=r"r.yaml:4: invalid YAML: could not determine a constructor for the tag "
                                           r"'tag:yaml.org,2002:python/object/apply:builtins.open'"):
        load_recipe(path)
    assert not marker.exists()


def test_a_run_folder_with_pickle_weights_is_refused(tiny_bert, wnut_small, tmp_path):
    import peftlab
    from peftlab.runs import load_run

    run = tmp_path / "run"
    peftlab.train(ner_recipe(tiny_bert, wnut_small, run, {"name": "lora", "r": 4}, max_steps=1, num_threads=1))
    assert load_run(run).model is not None
    adapter = run / "model" / "adapter_model.safetensors"
    adapter.unlink()  # as if the adapter had been replaced by a pickle from elsewhere
    with open(run / "model" / "adapter_model.bin", "wb") as fh:
        pickle.dump({"weights": _Trap(tmp_path / "PICKLE_WAS_LOADED")}, fh)
    with pytest.raises(PeftlabError, match=r"model: holds pickle weights \(adapter_model.bin\); pickle can run code"):
        load_run(run)
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists()


def test_recipes_and_specs_are_read_with_a_safe_loader():
    import yaml

    from peftlab.validation import _UniqueKeyLoader

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError):  # a Python object tag is refused, as by safe_load
        loader = _UniqueKeyLoader("!!python/object/apply:os.system ['true']")
        loader.get_single_data()
