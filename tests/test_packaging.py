"""Installing peftlab keeps a user's own torch/transformers/peft: dependencies are ranges, CI's exact
set is constraints.txt, and pip resolves the installed stack without replacing any of it."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
STACK = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def _constraints() -> dict[str, str]:
    pins = [ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln]
    return {name.strip(): version.strip() for name, version in pins}


def test_the_stack_is_ranges_and_constraints_pin_versions_inside_them():
    reqs, pins = _requirements(), _constraints()
    for name in STACK:
        spec = reqs[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned in pyproject.toml: {spec}"
        assert pins[name] in spec, f"constraints.txt {name}=={pins[name]} is outside {spec}"
        older = {"torch": "2.10.0", "transformers": "5.20.0", "peft": "0.21.0", "accelerate": "1.12.0",
                 "bitsandbytes": "0.48.0", "datasets": "5.0.0"}[name]
        assert older in spec  # another version a user may already have stays acceptable


def test_pip_keeps_the_installed_stack():
    """A dry-run install of this checkout into the test venv would replace none of the stack."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--quiet",
         "--report", "-", "-e", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert [i["metadata"]["name"] for i in report["install"]] == ["peftlab"]
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    conflicts = [ln for ln in check.stdout.splitlines() if ln.split(" ", 1)[0].lower() in STACK + ("peftlab",)]
    assert conflicts == [], check.stdout
