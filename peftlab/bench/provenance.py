"""What a record says about the code it ran: package versions and the git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Optional

VERSION_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "peftlab")
CODE_PATHS = ("peftlab", "recipes", "benchmarks", "pyproject.toml")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_info(cwd: Optional[Path] = None) -> dict:
    def git(*args: str) -> Optional[str]:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Only what can change a result counts as a change to the code: the package, the recipes, the
    # benchmark specs and scripts, the install. Not the bench's own output (benchmarks/results/,
    # whose records it rewrites), the docs or the tests.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--",
                *(f":(top){p}" for p in CODE_PATHS), ":(top,exclude)benchmarks/results")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}
