"""The table of bad inputs: every case runs the real CLI in a subprocess and must give exit code 2,
exactly one stderr line holding the exact expected fragment (file, key or line number, what was
expected), no traceback, and write nothing (the run folder does not exist afterwards).

Most cases run `peftlab train` (the command that writes); a few run `peftlab validate` to show
that it reports the same line. Placeholders in the expected text: {recipe} (the recipe file),
{tmp} (the case's folder), {tiny} (the tiny BERT), {pickle} (a tiny BERT with only pytorch_model.bin),
{train}/{validation}/{test} (the data files of the case).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_cli

SHIM = Path(__file__).resolve().parent / "fault_shim"

RECIPE = """\
backbone:
  name: {tiny}
task: token_classification
data:
  train: {train}
  validation: {validation}
  test: {test}
method:
  name: lora
  r: 4
train:
  lr: 1.0e-3
  epochs: 1
  num_threads: 1
  trackers: none
output:
  dir: {out}
"""
# line numbers: 2 backbone.name, 3 task, 5-7 data, 9 method.name, 10 method.r, 12 train.lr, 13 train.epochs


@dataclass
class Ctx:
    tmp: Path
    text: str
    values: dict
    env: dict = field(default_factory=dict)

    def sub(self, old: str, new: str) -> None:
        assert old in self.text, old
        self.text = self.text.replace(old, new, 1)

    def data_file(self, key: str, name: str, content: bytes | str) -> Path:
        """Replace the data file of split ``key`` by a new file with ``content``."""
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        self.sub(f"  {key}: {self.values[key]}", f"  {key}: {path}")
        self.values[key] = str(path)
        return path


@dataclass
class Case:
    id: str
    expected: str
    edit: Callable[[Ctx], None] = lambda c: None
    overrides: tuple = ()
    cmd: str = "train"
    extra_args: tuple = ()


def banking_csv(c: Ctx, header: str) -> None:
    """Turn the recipe into sequence classification on a CSV whose header is ``header``."""
    c.sub("task: token_classification", "task: sequence_classification")
    rows = "\n".join(f"{t},{lab}" for t, lab in [("my card has not arrived", "card_arrival"),
                                                   ("what is the exchange rate", "exchange_rate")] * 5)
    for key in ("train", "validation", "test"):
        c.data_file(key, f"{key}.csv", f"{header}\n{rows}\n")
    c.sub("data:\n", "data:\n  label_column: category\n")


def conll_with_label(c: Ctx, key: str, label: str) -> None:
    c.data_file(key, f"{key}.conll", f"Paris\tB-location\nis\tO\n\nAliens\t{label}\nland\tO\n")


CASES = [
    Case("unknown-key-suggests-closest", "{recipe}:12: train.lrr: unknown key (did you mean 'train.lr'?)",
         lambda c: c.sub("  lr: 1.0e-3", "  lrr: 1.0e-3"), cmd="validate"),
    Case("unknown-method-option-key", "{recipe}:10: method.rank: unknown key (did you mean 'method.r'?)",
         lambda c: c.sub("  r: 4", "  rank: 4")),
    Case("wrong-type", "{recipe}:13: train.epochs: Input should be a valid integer, unable to parse string as an "
         "integer (got 'two')", lambda c: c.sub("  epochs: 1", "  epochs: two")),
    Case("negative-lr", "{recipe}:12: train.lr: Input should be greater than 0 (got -0.001)",
         lambda c: c.sub("  lr: 1.0e-3", "  lr: -1.0e-3")),
    Case("lora-r-zero", "{recipe}:10: method.r: Input should be greater than 0 (got 0)",
         lambda c: c.sub("  r: 4", "  r: 0")),
    Case("missing-required-section", "{recipe}: backbone: required key is missing",
         lambda c: c.sub("backbone:\n  name: " + c.values["tiny"] + "\n", "")),
    Case("invalid-yaml", "{recipe}:14: invalid YAML: mapping values are not allowed here",
         lambda c: c.sub("  num_threads: 1", "  num_threads: 1: 2"), cmd="validate"),
    Case("override-unknown-key",
         "command line: override 'train.epoch=2': unknown key 'train.epoch' (did you mean 'train.epochs'?)",
         overrides=("train.epoch=2",)),
    Case("override-not-key-value", "command line: override 'train.epochs' is not of the form key=value",
         overrides=("train.epochs",)),
    Case("unknown-method", "{recipe}:9: method.name: unknown method 'loraa' (did you mean 'lora'?)",
         lambda c: c.sub("  name: lora", "  name: loraa")),
    Case("method-cannot-be-quantized",
         "{recipe}: method.name: method 'full' cannot train a quantized backbone (backbone.quantization: nf4); "
         "methods that can: ", lambda c: (c.sub("  name: lora\n  r: 4", "  name: full"),
                                         c.sub("backbone:\n", "backbone:\n  quantization: nf4\n"))),
    Case("quantization-without-bitsandbytes",
         "backbone.quantization: 'nf4' needs the bitsandbytes package, which is not installed (pip install bitsandbytes)",
         lambda c: (c.sub("backbone:\n", "backbone:\n  quantization: nf4\n"),
                    c.env.update(PEFTLAB_TEST_HIDE="bitsandbytes"))),
    Case("quantization-without-bitsandbytes-validate",
         "backbone.quantization: 'int8' needs the bitsandbytes package, which is not installed (pip install bitsandbytes)",
         lambda c: (c.sub("backbone:\n", "backbone:\n  quantization: int8\n"),
                    c.env.update(PEFTLAB_TEST_HIDE="bitsandbytes")), cmd="validate"),
    Case("unknown-task", "{recipe}:3: task: unknown task 'ner'; known: ",
         lambda c: c.sub("task: token_classification", "task: ner")),
    Case("unknown-metric", "train.metric: 'f2' is not a metric of task token_classification (choose one of: f1, ",
         overrides=("train.metric=f2",)),
    Case("missing-data-file", "data.validation: file not found: {tmp}/missing.conll",
         lambda c: c.sub(f"  validation: {c.values['validation']}", f"  validation: {c.tmp}/missing.conll")),
    Case("empty-split", "data.test: no examples in {test} (empty split)",
         lambda c: c.data_file("test", "empty.conll", "\n\n")),
    Case("conll-line-without-tag", "{train}:4: expected 'TOKEN<TAB>TAG', found no tag in 'Paris'",
         lambda c: c.data_file("train", "notag.conll", "I\tO\nlove\tO\n\nParis\n"), cmd="validate"),
    Case("conll-line-without-tag-train", "{train}:2: expected 'TOKEN<TAB>TAG', found no tag in 'love'",
         lambda c: c.data_file("train", "notag.conll", "I\tO\nlove\t\n")),
    Case("unknown-label-in-dev",
         "{validation}:4: label 'B-alien' in the validation split does not occur in train (train labels: ",
         lambda c: conll_with_label(c, "validation", "B-alien")),
    Case("unknown-label-in-test",
         "{test}:4: label 'I-ufo' in the test split does not occur in train (train labels: ",
         lambda c: conll_with_label(c, "test", "I-ufo"), cmd="validate"),
    Case("csv-without-text-column",
         "{train}:1: no column 'text' in the header (columns: sentence, category); "
         "set data.text_column / data.label_column", lambda c: banking_csv(c, "sentence,category")),
    Case("non-utf8-data", "{train}:3: not valid UTF-8 (byte 0xe9); data files must be UTF-8",
         lambda c: c.data_file("train", "latin1.conll", "I\tO\nlove\tO\nCaf\xe9\tB-location\n".encode("latin-1"))),
    Case("unknown-backbone-path", "backbone.name: no such model folder: /nonexistent/tiny-bert",
         lambda c: c.sub(f"  name: {c.values['tiny']}", "  name: /nonexistent/tiny-bert")),
    Case("unknown-backbone-hub-name",
         "backbone.name: cannot load 'nobody/no-such-model': not a local folder, not a packaged model (",
         lambda c: c.sub(f"  name: {c.values['tiny']}", "  name: nobody/no-such-model")),
    Case("pickle-only-backbone",
         "backbone.name: {pickle} holds only pickle weights (pytorch_model.bin); pickle can run code on load: "
         "convert them to safetensors, or set backbone.allow_pickle: true if you trust them",
         lambda c: c.sub(f"  name: {c.values['tiny']}", f"  name: {c.values['pickle']}")),
    Case("method-name-is-not-an-import-path", "{recipe}:9: method.name: unknown method 'os.system'",
         lambda c: c.sub("  name: lora", "  name: os.system")),
    Case("task-is-not-an-import-path", "{recipe}:3: task: unknown task 'builtins.eval'; known: ",
         lambda c: c.sub("task: token_classification", "task: builtins.eval")),
    Case("unknown-command-line-flag", "command line: unrecognized arguments: --resum (see `peftlab --help`)",
         extra_args=("--resum",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(case, tmp_path, tiny_bert, pickle_bert, wnut_small):
    values = {"tiny": str(tiny_bert), "pickle": str(pickle_bert), "out": str(tmp_path / "run"), "tmp": str(tmp_path),
              **wnut_small}
    ctx = Ctx(tmp=tmp_path, text=RECIPE.format(**values), values=values)
    case.edit(ctx)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ctx.text, encoding="utf-8")
    env = dict(ctx.env)
    if env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")]))
    before = sorted(p.name for p in tmp_path.iterdir())

    res = run_cli(case.cmd, str(recipe), *case.overrides, *case.extra_args, env=env, timeout=300)

    expected = case.expected.format(recipe=recipe, **{k: v for k, v in ctx.values.items()})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("peftlab: error: "), lines[0]
    assert expected in lines[0], f"\nexpected fragment: {expected}\n got: {lines[0]}"
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing else written either
