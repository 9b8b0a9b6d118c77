"""Atomic writes: a writer that dies at any moment leaves either the old result or the new one, never a
partial file or folder under the final name; leftovers are temporaries that the next run removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from peftlab import atomicio
from peftlab.atomicio import TMP_PREFIX, atomic_dir, remove_stale_temporaries, write_json


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    monkeypatch.setattr(atomicio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left behind


def test_atomic_dir_error_leaves_the_previous_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "weights.safetensors").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert (final / "weights.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(final) as tmp:
        (tmp / "weights.safetensors").write_text("new")
    assert (final / "weights.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sigkill_inside_atomic_dir_never_shows_a_final_folder(tmp_path):
    code = (
        "import sys, time\n"
        "from peftlab.atomicio import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'a.safetensors').write_text('x')\n"
        "    (tmp.parent / 'READY').write_text('')\n"
        "    time.sleep(600)\n"
    )
    final = tmp_path / "step-000004"
    proc = subprocess.Popen([sys.executable, "-c", code, str(final)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (tmp_path / "READY").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not final.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(leftovers) == 1 and (leftovers[0] / "a.safetensors").is_file()
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["READY"]
