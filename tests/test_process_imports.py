"""What a one-recipe training process loads: an unquantized run started from the command line never
imports bitsandbytes (peft would, and bitsandbytes' import loads torch's compiler); no run started
from the command line imports SciPy (transformers' model code would, for its object-detection
losses); a call from Python (``cli.main([...])``, the API) leaves imports alone."""

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
print("RESULT", rc, sys.modules.get("bitsandbytes") is not None, "peft" in sys.modules, sys.modules.get("scipy") is not None)
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
    rc, bnb, peft, scipy = _run(tmp_path, tiny_bert, wnut_small, "main()", {"name": "lora", "r": 2})
    assert (rc, bnb, peft, scipy) == ("0", "False", "True", "False")  # LoRA trained through peft, without either
    assert (tmp_path / "run" / "metrics.json").exists()


def test_python_call_leaves_imports_alone(tmp_path, tiny_bert, wnut_small):
    rc, bnb, _, scipy = _run(tmp_path, tiny_bert, wnut_small, "main(sys.argv[1:])", {"name": "lora", "r": 2})
    assert (rc, bnb, scipy) == ("0", "True", "True")


def test_quantized_command_line_run_keeps_bitsandbytes(tmp_path, tiny_bert, wnut_small):
    rc, bnb, _, scipy = _run(tmp_path, tiny_bert, wnut_small, "main()", {"name": "lora", "r": 2}, quantization="int8")
    assert (rc, bnb, scipy) == ("0", "True", "False")


def test_nf4_command_line_run_trains_without_scipy(tmp_path, tiny_bert, wnut_small):
    rc, bnb, _, scipy = _run(tmp_path, tiny_bert, wnut_small, "main()", {"name": "lora", "r": 2}, quantization="nf4")
    assert (rc, bnb, scipy) == ("0", "True", "False")


def test_scipy_left_alone_once_transformers_is_imported():
    """transformers caches at import whether SciPy is installed; hiding it after that would break its
    model import, so the process keeps it."""
    code = ("import sys, transformers; from peftlab.system import skip_scipy; print(skip_scipy()); "
            "import transformers.modeling_utils; print(sys.modules.get('scipy') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.stdout.split()[-2:] == ["False", "True"], out.stderr[-2000:]
