"""What a one-recipe training process loads: an unquantized run started from the command line never
imports bitsandbytes (peft would, and bitsandbytes' import loads torch's compiler); a quantized run
and a call from Python (``cli.main([...])``, the API) leave imports alone."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import ROOT, ner_recipe

CHILD = """
import sys
sys.argv = ["peftlab", "train", {recipe!r}]
from peftlab.cli import main
rc = {call}
print("RESULT", rc, sys.modules.get("bitsandbytes") is not None, "peft" in sys.modules)
"""


def _run(tmp_path, tiny_bert, wnut_small, call: str, method: dict, **backbone) -> list[str]:
    recipe = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", method, max_steps=2)
    recipe["backbone"].update(backbone)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = CHILD.format(recipe=str(path), call=call)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-2000:]
    return line[0].split()[1:]


def test_unquantized_command_line_run_skips_bitsandbytes(tmp_path, tiny_bert, wnut_small):
    rc, bnb, peft = _run(tmp_path, tiny_bert, wnut_small, "main()", {"name": "lora", "r": 2})
    assert (rc, bnb, peft) == ("0", "False", "True")  # LoRA trained through peft, without bitsandbytes
    assert (tmp_path / "run" / "metrics.json").exists()


def test_python_call_leaves_imports_alone(tmp_path, tiny_bert, wnut_small):
    rc, bnb, _ = _run(tmp_path, tiny_bert, wnut_small, "main(sys.argv[1:])", {"name": "lora", "r": 2})
    assert (rc, bnb) == ("0", "True")


def test_quantized_command_line_run_keeps_bitsandbytes(tmp_path, tiny_bert, wnut_small):
    rc, bnb, _ = _run(tmp_path, tiny_bert, wnut_small, "main()", {"name": "lora", "r": 2}, quantization="int8")
    assert (rc, bnb) == ("0", "True")


def test_skip_import_hides_a_module_from_find_spec():
    code = ("import importlib.util, sys; from peftlab.system import skip_import; "
            "print(skip_import('bitsandbytes'), importlib.util.find_spec('bitsandbytes'), skip_import('importlib.util'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "None", "False"]
