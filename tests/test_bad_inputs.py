"""The table of bad inputs: every case runs the real CLI in a subprocess and must give exit code 2,
exactly one stderr line holding the exact expected fragment (file, key or line number, what was
expected), no traceback, and write nothing (the run folder does not exist afterwards).

Most cases run `peftlab train` (the command that writes); a few run `peftlab validate` to show
that it reports the same line. Placeholders in the expected text: {recipe} (the recipe file),
{tmp} (the case's folder), {tiny} (the tiny BERT), {pickle} (a tiny BERT with only pytorch_model.bin),
{train}/{validation}/{test} (the data files of the case).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

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
    raw: Optional[bytes] = None  # written as the recipe file instead of ``text``
    target: Optional[str] = None  # the path given on the command line instead of the recipe file

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


def jsonl_ner(c: Ctx, bad_row: dict) -> None:
    """NER from JSONL: two good rows, then ``bad_row`` in train."""
    good = [{"tokens": ["Paris", "is", "big"], "tags": ["B-location", "O", "O"]}] * 2
    c.data_file("train", "train.jsonl", "".join(json.dumps(r) + "\n" for r in good + [bad_row]))


def jsonl_text(c: Ctx, rows: list[dict]) -> None:
    """Text classification from JSONL rows (train) and two good rows (validation, test)."""
    c.sub("task: token_classification", "task: sequence_classification")
    good = [{"text": "my card", "label": "card"}, {"text": "the rate", "label": "rate"}]
    c.data_file("train", "train.jsonl", "".join(json.dumps(r) + "\n" for r in good + rows))
    for key in ("validation", "test"):
        c.data_file(key, f"{key}.jsonl", "".join(json.dumps(r) + "\n" for r in good))


def backbone_copy(c: Ctx, name: str, change: Callable[[Path], None]) -> None:
    """Point the recipe at a copy of the tiny BERT changed by ``change``."""
    folder = c.tmp / name
    shutil.copytree(c.values["tiny"], folder)
    change(folder)
    c.sub(f"  name: {c.values['tiny']}", f"  name: {folder}")
    c.values["copy"] = str(folder)


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


def pickle_as_safetensors(folder: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(2)}, folder / "model.safetensors")


def output_at(c: Ctx, path: Path) -> None:
    c.sub(f"  dir: {c.values['out']}", f"  dir: {path}")
    c.values["target_out"] = str(path)


def bench_spec(c: Ctx, override: str) -> None:
    """The case's recipe file becomes a bench spec over a copy of the recipe, with ``override``."""
    recipe = c.tmp / "lora.yaml"
    recipe.write_text(c.text, encoding="utf-8")
    c.raw = (f"name: bad\nseeds: [1]\nmethods:\n  - name: lora\n    recipe: {recipe}\n"
             f"    overrides: [{override}]\n").encode()


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
         "the recipe names it in data.text_column", lambda c: banking_csv(c, "sentence,category")),
    Case("non-utf8-data", "{train}:3: not UTF-8 text (byte 0xe9); data files must be UTF-8",
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
    # -- recipes that silently meant something else
    Case("duplicate-yaml-key", "{recipe}:13: duplicate key 'lr' (first at line 12); YAML would keep only the last",
         lambda c: c.sub("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 2.0e-3\n")),
    Case("override-method-by-name",
         "command line: override 'method=ia3': would replace every method option; to change the method and keep "
         "the recipe's options write method.name=ia3", overrides=("method=ia3",)),
    Case("override-bad-value-names-the-override",
         "command line: override 'train.lr=fast': train.lr: Input should be a valid number",
         overrides=("train.lr=fast",)),
    Case("override-infinite-lr", "command line: override 'train.lr=.inf': train.lr: must be a finite number (got inf)",
         overrides=("train.lr=.inf",)),
    Case("recipe-nan-value", "{recipe}:13: train.epochs: must be a finite number (got nan)",
         lambda c: c.sub("  epochs: 1", "  epochs: .nan"), cmd="validate"),
    Case("recipe-is-a-folder", "{tmp}: is a folder; expected a recipe file (.yaml)",
         lambda c: setattr(c, "target", str(c.tmp)), cmd="validate"),
    # -- silently wrong data
    Case("plain-tags-not-iob2", "{train}:1: tag 'PER' is not IOB2: expected O, B-TYPE or I-TYPE (e.g. B-PER / I-PER)",
         lambda c: c.data_file("train", "plain.conll", "Jo\tPER\nruns\tO\n")),
    Case("lowercase-iob-prefix", "{train}:1: tag 'b-location' is not IOB2: expected O, B-TYPE or I-TYPE",
         lambda c: c.data_file("train", "lower.conll", "Paris\tb-location\nis\tO\n"), cmd="validate"),
    Case("jsonl-null-text", "{train}:3: 'text' is null; expected a string",
         lambda c: jsonl_text(c, [{"text": None, "label": "card"}])),
    Case("jsonl-number-text", "{train}:3: 'text' is a number; expected a string",
         lambda c: jsonl_text(c, [{"text": 42, "label": "card"}]), cmd="validate"),
    Case("jsonl-empty-text", "{train}:3: 'text' is empty",
         lambda c: jsonl_text(c, [{"text": "  ", "label": "card"}])),
    Case("jsonl-labels-mix-types", "{train}:3: label 1 is a number, but the label at {train}:1 is a string; use one "
         "type for every label", lambda c: jsonl_text(c, [{"text": "hi", "label": 1}])),
    Case("csv-empty-text-cell", "{train}:3: column 'text' is empty",
         lambda c: (banking_csv(c, "text,category"),
                    c.data_file("train", "empty.csv", "text,category\nmy card,card_arrival\n,exchange_rate\n"))),
    # -- tracebacks on bad data
    Case("jsonl-fewer-tags-than-tokens", "{train}:3: 2 tokens but 1 tags; expected one tag per token",
         lambda c: jsonl_ner(c, {"tokens": ["a", "b"], "tags": ["O"]})),
    Case("jsonl-integer-tags", "{train}:3: 'tags' is a list holding non-strings; expected a list of strings",
         lambda c: jsonl_ner(c, {"tokens": ["a", "b"], "tags": [0, 1]}), cmd="validate"),
    Case("jsonl-tokens-as-a-string", "{train}:3: 'tokens' is a string; expected a list of strings",
         lambda c: jsonl_ner(c, {"tokens": "a b", "tags": ["O", "O"]})),
    Case("jsonl-empty-token", "{train}:3: token 2 is empty; every token must be a word",
         lambda c: jsonl_ner(c, {"tokens": ["a", ""], "tags": ["O", "O"]})),
    Case("csv-stray-quote", "{train}:3: not valid CSV: ',' expected after '\"'",
         lambda c: (banking_csv(c, "text,category"),
                    c.data_file("train", "quote.csv", "text,category\nmy card,card_arrival\n\"the\" rate,exchange_rate\n")), cmd="validate"),
    Case("max-length-above-positions", "data.max_length: 4096 is more than the 128 positions of {tiny}; use at most 128",
         overrides=("data.max_length=4096",)),
    Case("max-length-above-positions-validate", "data.max_length: 512 is more than the 128 positions",
         overrides=("data.max_length=512",), cmd="validate"),
    Case("target-modules-match-nothing",
         "method.target_modules: ['attn'] matches no module of {tiny}; its linear layers are named: classifier, dense",
         overrides=("method.target_modules=[attn]",)),
    Case("target-modules-match-nothing-validate", "method.target_modules: ['attn'] matches no module of {tiny}",
         overrides=("method.target_modules=[attn]",), cmd="validate"),
    # -- backbone folders that cannot work
    Case("backbone-without-tokenizer", "backbone.name: {copy} has no tokenizer files (one of tokenizer.json, vocab.txt",
         lambda c: backbone_copy(c, "no-tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json",
                                                                                       "tokenizer_config.json")])),
    Case("backbone-truncated-safetensors", "backbone.name: {copy}/model.safetensors is not a complete safetensors file (",
         lambda c: backbone_copy(c, "truncated", lambda f: truncate(f / "model.safetensors", -1000))),
    Case("backbone-pickle-named-safetensors", "backbone.name: {copy}/model.safetensors is not a complete safetensors file",
         lambda c: backbone_copy(c, "disguised", pickle_as_safetensors), cmd="validate"),
    Case("backbone-invalid-config-json", "backbone.name: {copy}/config.json is not valid JSON (",
         lambda c: backbone_copy(c, "bad-config", lambda f: (f / "config.json").write_text("{not json"))),
    # -- output folders: never lose data, never a traceback
    Case("output-dir-is-a-file", "output.dir: {target_out} is a file, not a folder",
         lambda c: (output_at(c, c.tmp / "a_file"), (c.tmp / "a_file").write_text("mine")), extra_args=("--overwrite",)),
    Case("output-dir-under-a-file", "output.dir: {tmp}/a_file is a file, so {target_out} cannot be a folder under it",
         lambda c: (output_at(c, c.tmp / "a_file" / "run"), (c.tmp / "a_file").write_text("mine")),
         extra_args=("--overwrite",)),
    Case("output-dir-is-a-symlink", "output.dir: {target_out} is a symbolic link; give the folder itself",
         lambda c: ((c.tmp / "real").mkdir(), (c.tmp / "link").symlink_to(c.tmp / "real"), output_at(c, c.tmp / "link"))),
    Case("output-dir-holds-the-data", "output.dir: {target_out} holds the data file data.train {train}",
         lambda c: output_at(c, Path(c.values["train"]).parent), extra_args=("--overwrite",)),
    Case("output-dir-holds-the-recipe", "output.dir: {tmp} holds the recipe {recipe}",
         lambda c: output_at(c, c.tmp), extra_args=("--overwrite",)),
    Case("overwrite-a-folder-peftlab-did-not-make", "output.dir: {target_out} was not made by peftlab",
         lambda c: (output_at(c, c.tmp / "mine"), (c.tmp / "mine").mkdir(), (c.tmp / "mine" / "x.txt").write_text("x")),
         extra_args=("--overwrite",)),
    # -- the other commands' inputs
    Case("bench-spec-not-utf8", "{recipe}:1: not UTF-8 text (byte 0xe9); a benchmark spec must be UTF-8 YAML",
         lambda c: setattr(c, "raw", "name: caf\xe9\n".encode("latin-1")), cmd="bench"),
    Case("bench-spec-duplicate-key", "{recipe}:2: duplicate key 'name' (first at line 1)",
         lambda c: setattr(c, "raw", b"name: a\nname: b\n"), cmd="bench"),
    Case("bench-spec-bad-override", "{recipe}: methods: 'lora': override 'train.epoch=1': unknown key 'train.epoch' "
         "(did you mean 'train.epochs'?)", lambda c: bench_spec(c, "train.epoch=1"), cmd="bench"),
    Case("report-binary-results", "{recipe}:1: not UTF-8 text (byte 0x89); expected the JSON lines peftlab bench writes",
         lambda c: setattr(c, "raw", b"\x89PNG\r\n\x1a\n\xff\xfe"), cmd="report"),
    Case("report-junk-line", "{recipe}:2: not a JSON record (",
         lambda c: setattr(c, "raw", b'{"cell": "a-s1", "status": "ok"}\nnot json\n'), cmd="report"),
    Case("report-on-a-folder", "{tmp}: is a folder; expected a results file (results.jsonl)",
         lambda c: setattr(c, "target", str(c.tmp)), cmd="report"),
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
    recipe.write_bytes(ctx.raw if ctx.raw is not None else ctx.text.encode("utf-8"))
    env = dict(ctx.env)
    if env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")]))
    before = sorted(p.name for p in tmp_path.iterdir())

    res = run_cli(case.cmd, ctx.target or str(recipe), *case.overrides, *case.extra_args, env=env, timeout=300)

    expected = case.expected.format(recipe=recipe, **{k: v for k, v in ctx.values.items()})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("peftlab: error: "), lines[0]
    assert expected in lines[0], f"\nexpected fragment: {expected}\n got: {lines[0]}"
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing else written either
