"""Recipe schema: loading, overrides, resolved output, and one-line errors for bad recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from peftlab.errors import PeftlabError
from peftlab.recipe import load_recipe
from peftlab.reference import describe_schema

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


BASE = """\
backbone: {name: sentence-transformers/all-MiniLM-L6-v2}
task: token_classification
data:
  train: ../shared/data/wnut17/wnut17train.conll
  validation: ../shared/data/wnut17/emerging.dev.conll
method: {name: lora, r: 8}
train: {lr: 1.0e-3, epochs: 2}
"""


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_names_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# Run: peftlab train recipes/"), first
    assert path.name in first
    assert recipe.output.dir


def test_defaults_and_overrides(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["train.epochs=1", "method.r=16", "train.lr=3e-4", "method.target_modules=[query,value]"])
    assert r.train.epochs == 1
    assert r.train.lr == pytest.approx(3e-4)
    assert r.method_options.r == 16
    assert r.method_options.target_modules == ["query", "value"]
    assert r.train.scheduler == "linear" and r.train.batch_size == 16  # defaults filled in
    assert r.output.dir == "runs/r"  # default: runs/<recipe stem>
    resolved = yaml.safe_load(r.to_yaml())
    assert resolved["method"] == {**resolved["method"], "name": "lora", "r": 16, "alpha": 16.0}
    assert resolved["train"]["epochs"] == 1


def test_method_short_form(tmp_path):
    r = load_recipe(write(tmp_path, BASE.replace("method: {name: lora, r: 8}", "method: full")))
    assert r.method.name == "full"


@pytest.mark.parametrize(
    "change, overrides, fragment",
    [
        (("train: {lr: 1.0e-3, epochs: 2}", "train: {lrr: 1.0e-3, epochs: 2}"), [],
         "r.yaml:7: train.lrr: unknown key (did you mean 'train.lr'?)"),
        (("train: {lr: 1.0e-3, epochs: 2}", "train: {lr: 1.0e-3, epochs: two}"), [],
         "r.yaml:7: train.epochs: Input should be a valid integer"),
        (("train: {lr: 1.0e-3, epochs: 2}", "train: {lr: -1.0, epochs: 2}"), [],
         "train.lr: Input should be greater than 0 (got -1.0)"),
        (("{name: lora, r: 8}", "{name: lora, r: 0}"), [], "method.r: Input should be greater than 0"),
        (("{name: lora, r: 8}", "{name: lora, rank: 8}"), [], "method.rank: unknown key"),
        (("{name: lora, r: 8}", "{name: loraa}"), [], "method.name: unknown method 'loraa' (did you mean 'lora'?)"),
        (("task: token_classification", "task: ner"), [], "task: unknown task 'ner'"),
        (("backbone: {name: sentence-transformers/all-MiniLM-L6-v2}\n", ""), [], "backbone: required key is missing"),
        ((None, None), ["train.epoch=1"], "override 'train.epoch=1': unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ((None, None), ["trian.epochs=1"], "unknown key 'trian' (did you mean 'train'?)"),
        ((None, None), ["train.epochs"], "override 'train.epochs' is not of the form key=value"),
        ((None, None), ["train.epochs=0"], "train.epochs: Input should be greater than 0"),
    ],
)
def test_bad_recipes_raise_one_line(tmp_path, change, overrides, fragment):
    text = BASE if change[0] is None else BASE.replace(*change)
    with pytest.raises(PeftlabError) as info:
        load_recipe(write(tmp_path, text), overrides)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(PeftlabError, match=r"r.yaml:3: invalid YAML"):
        load_recipe(write(tmp_path, "backbone: {name: x}\ntask: a\n  oops: b\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PeftlabError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_exit_code_2_and_one_line(tmp_path):
    bad = write(tmp_path, BASE.replace("lr: 1.0e-3", "lr: 1.0e-3, batchsize: 8"))
    res = run_cli("validate", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "train.batchsize: unknown key (did you mean 'train.batch_size'?)" in lines[0]
    assert str(bad) in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_missing_data_file_and_unknown_method(tmp_path):
    res = run_cli("validate", str(write(tmp_path, BASE)), "data.train=/nonexistent/train.conll")
    assert res.returncode == 2
    assert res.stderr.strip() == "peftlab: error: data.train: file not found: /nonexistent/train.conll"
    res = run_cli("validate", str(write(tmp_path, BASE)), "method.name=adapterz")
    assert res.returncode == 2 and "method.name: unknown method 'adapterz'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_validate_reports_counts():
    res = run_cli("validate", "recipes/lora_ner.yaml")
    assert res.returncode == 0, res.stderr
    assert "train 3394, validation 1009, test 1287, labels 13" in res.stdout


def test_validate_names_method_options_quantization_and_trainable_count():
    res = run_cli("validate", "recipes/qlora_ner.yaml")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "method lora (r=16, alpha=32.0), quantization nf4" in out
    assert "trainable 668,557 of " in out  # peft's count of this recipe (efficiency_minilm's nf4 cell)
    plain = run_cli("validate", "recipes/full_ner.yaml").stdout
    assert "method full, quantization none" in plain and "(100.00%)" in plain


def test_schema_shows_types_as_recipe_authors_read_them():
    text = describe_schema()
    for raw in ("typing.", "<class", "Union", "efficiencyWhether", ".For example"):
        assert raw not in text, raw
    assert "target_modules: str | list[str] | null" in text
    assert "quantization: 'none' | 'int8' | 'nf4' | 'fp4'  (default 'none')" in text
    # peft annotates c3a's init_weights as bool but defaults it to a string: both are accepted
    assert "init_weights: bool | 'gaussian' | 'kaiming_uniform' | 'xavier_uniform' | null  (default 'xavier_uniform')" in text


def test_help_and_version_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; from peftlab.cli import main\n"
            "for argv in (['--version'], ['--help'], ['train', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit as e: assert e.code == 0\n"
            "import peftlab; print('torch' in sys.modules, peftlab.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("peftlab ") and out.strip().endswith("False 0.1.0"), out
    assert "predict" in out and "merge" in out and "bench" in out  # every command listed in --help


def test_schema_prints_every_key():
    text = describe_schema()
    for key in ("backbone:", "quantization:", "early_stopping_patience:", "max_train_samples:", "unfreeze_last_layers:", "target_modules:"):
        assert key in text
    res = run_cli("schema")
    assert res.returncode == 0 and "warmup_ratio" in res.stdout


def test_overrides_may_follow_flags():
    from peftlab.cli import parse_args

    args = parse_args(["train", "r.yaml", "--overwrite", "train.epochs=1", "method.r=4"])
    assert args.overwrite and args.overrides == ["train.epochs=1", "method.r=4"]
    args = parse_args(["train", "r.yaml", "train.epochs=1", "--resume", "train.lr=0.1"])
    assert args.resume and args.overrides == ["train.epochs=1", "train.lr=0.1"]
    with pytest.raises(PeftlabError, match="unrecognized arguments: --nope"):
        parse_args(["train", "r.yaml", "--overwrite", "--nope"])


def test_the_docs_recipe_table_lists_every_recipe_with_its_method_lr_and_epochs():
    """docs/recipes.md's table is written by hand: it must name every shipped recipe and the method,
    learning rate and epochs each one sets."""
    from peftlab.recipe import TrainConfig

    rows = {}
    for line in (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `recipes/"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == [f"recipes/{p.name}" for p in RECIPES]
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        _, _, _, method, lr, epochs = rows[f"recipes/{path.name}"]
        train = raw.get("train", {})
        assert method.split(" ")[0] == raw["method"]["name"], path.name
        assert float(lr) == float(train.get("lr", TrainConfig.model_fields["lr"].default)), path.name
        assert int(epochs) == train.get("epochs", TrainConfig.model_fields["epochs"].default), path.name
