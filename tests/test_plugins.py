"""Third-party method plugins: a package that declares an entry point in the ``peftlab.methods``
group is listed by ``peftlab methods`` and runs from a recipe, with nothing edited in peftlab.

The package is "installed" the way pip leaves it on disk: a module plus a ``*.dist-info`` folder
whose ``entry_points.txt`` names the class, on a folder put on ``PYTHONPATH`` of a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import ner_recipe, run_cli

# A real (if small) method: train only the bias terms of the backbone (BitFit), plus the head.
PLUGIN = '''
import torch
from pydantic import BaseModel, ConfigDict, Field

from peftlab.methods import Method


class BitFitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_layernorm: bool = Field(False, description="also train LayerNorm weights")


class BitFit(Method):
    description = "BitFit: train the bias terms only (third-party test plugin)"
    Options = BitFitOptions
    can_merge = False
    supports_quantization = False

    def apply(self, model, ctx):
        for name, p in model.named_parameters():
            head = any(name == h or name.startswith(h + ".") for h in ctx.head_names)
            ln = self.options.include_layernorm and "LayerNorm" in name
            p.requires_grad_(head or name.endswith(".bias") or ln)
        return model
'''

BROKEN = "raise ImportError('this plugin needs a package that is not installed')\n"


def install_plugins(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bitfit_plugin.py").write_text(PLUGIN)
    (folder / "broken_plugin.py").write_text(BROKEN)
    dist = folder / "bitfit_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bitfit-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[peftlab.methods]\nbitfit = bitfit_plugin:BitFit\nbroken = broken_plugin:Broken\n"
    )
    return folder


def test_plugin_is_listed_and_trains_from_a_recipe(tiny_bert, wnut_small, tmp_path):
    env = {"PYTHONPATH": str(install_plugins(tmp_path / "site"))}

    listed = run_cli("methods", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["bitfit"]["description"].startswith("BitFit") and rows["bitfit"]["merges"] is False
    assert "lora" in rows and "broken" not in rows  # a broken plugin does not hide the others...
    # ...and is reported in one line naming the entry point and why
    assert "method plugin 'broken' failed to load" in listed.stderr and "ImportError" in listed.stderr

    out = tmp_path / "run"
    recipe = tmp_path / "bitfit.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, out, {"name": "bitfit"},
                                                max_steps=4, lr=1e-2, log_every=1)))
    res = run_cli("train", str(recipe), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    params = json.loads((out / "params.json").read_text())
    # every bias of the backbone (LayerNorm biases included), counted on the same model by torch
    from transformers import AutoModelForTokenClassification

    labels = json.loads((out / "labels.json").read_text())
    model = AutoModelForTokenClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if n.endswith(".bias") and not n.startswith("classifier"))
    assert params["trainable_params_without_head"] == expected
    assert json.loads((out / "model" / "peftlab_method.json").read_text())["method"] == "bitfit"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss"]) == 4 and "f1" in metrics["test"]

    # an option the plugin's schema does not know is the usual one-line error, exit 2
    bad = run_cli("validate", str(recipe), "method.include_layernorms=true", env=env)
    assert bad.returncode == 2 and "include_layernorm" in bad.stderr and "Traceback" not in bad.stderr

    # the plugin's run reloads (predict) in a process that has the plugin installed
    pred = run_cli("predict", str(out), "Paris is nice", env=env)
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert "entities" in json.loads(pred.stdout.strip().splitlines()[-1])


def test_unknown_plugin_name_without_the_package(tiny_bert, wnut_small, tmp_path):
    recipe = tmp_path / "bitfit.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "bitfit"})))
    res = run_cli("validate", str(recipe))
    assert res.returncode == 2 and "unknown method 'bitfit'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


class _EntryPoint:
    """What importlib.metadata yields for one declared entry point."""

    def __init__(self, name, target):
        self.name, self.value, self._target = name, f"pkg:{name}", target
        self.dist = type("Dist", (), {"name": "some-plugin"})()

    def load(self):
        return self._target


def test_registry_vets_entry_points_of_every_kind(monkeypatch):
    """The registry, not each plugin package, refuses a class of the wrong kind or with a name
    other than its entry point's; a valid task plugin registers under its entry-point name."""
    import importlib.metadata

    from peftlab.registry import Registry
    from peftlab.tasks import Task
    from peftlab.tasks.sequence_classification import SequenceClassification

    class Renamed(SequenceClassification):
        name = "other_name"

    class Pairs(SequenceClassification):
        pass

    eps = [_EntryPoint("not_a_task", dict), _EntryPoint("mine", Renamed), _EntryPoint("pairs", Pairs)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps if group == "peftlab.tasks" else [])
    registry = Registry("task", "peftlab.tasks", builtins=("sequence_classification",))
    registry.configure(Task)
    problems = registry.problems()
    assert any("'not_a_task'" in p and "is not a subclass of peftlab.tasks.Task" in p for p in problems), problems
    assert any("Renamed.name is 'other_name' but the entry point is named 'mine'" in p for p in problems), problems
    assert registry.get("pairs") is Pairs and Pairs.name == "pairs"
    assert registry.source("pairs") == "some-plugin"
