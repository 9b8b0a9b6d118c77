"""A disk that fills up mid-run: a real small tmpfs as output.dir (mounted in a private mount
namespace, so no root outside it is needed where user namespaces are allowed). The run stops with
one line and exit 3 naming the last good checkpoint, which is intact; with space again, --resume
finishes the run. Where no namespace can be made, the same ENOSPC comes from the checkpoint writer
(safetensors' own error, raised by tests/fault_shim)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import yaml

from conftest import ROOT, ner_recipe
from peftlab.checkpoint import list_checkpoints, load_checkpoint

SHIM = ROOT / "tests" / "fault_shim"
SCRIPT = """
set -u
mount -t tmpfs -o size={small} tmpfs {mnt} || exit 90
cd {root}
{py} -m peftlab.cli train {recipe} > {save}/first.out 2> {save}/first.err; echo $? > {save}/first.rc
cp -a {mnt}/run {save}/after_failure
mount -o remount,size=256m {mnt}
{py} -m peftlab.cli train {recipe} --resume > {save}/resumed.out 2> {save}/resumed.err; echo $? > {save}/resumed.rc
cp -a {mnt}/run {save}/resumed
"""


def _namespace_command() -> list[str] | None:
    for cmd in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if shutil.which("unshare") is None:
            return None
        probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                                "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return cmd
    return None


def _run_on_small_disk(tmp_path, recipe_path, mnt):
    ns = _namespace_command()
    save = tmp_path / "save"
    save.mkdir()
    if ns is not None:
        script = SCRIPT.format(small="20m", mnt=mnt, root=ROOT, py=sys.executable, recipe=recipe_path, save=save)
        res = subprocess.run([*ns, "sh", "-c", script], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0 and (save / "first.rc").is_file(), res.stderr[-3000:]
        return save, "tmpfs"
    # fallback: ENOSPC from the real safetensors writer at the second checkpoint
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")])),
           "PEFTLAB_TEST_FAULT": "enospc_at_checkpoint:2"}
    first = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", str(recipe_path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    (save / "first.rc").write_text(str(first.returncode))
    (save / "first.err").write_text(first.stderr)
    shutil.copytree(mnt / "run", save / "after_failure")
    env.pop("PEFTLAB_TEST_FAULT")
    again = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", str(recipe_path), "--resume"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    (save / "resumed.rc").write_text(str(again.returncode))
    (save / "resumed.err").write_text(again.stderr)
    shutil.copytree(mnt / "run", save / "resumed")
    return save, "shim"


def test_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(tiny_bert, wnut_small, tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    # full fine-tuning of the tiny BERT: a checkpoint holds weights + two AdamW moments (~12 MB),
    # so 20 MB fit the first checkpoint and the best model, not the second checkpoint
    recipe = ner_recipe(tiny_bert, wnut_small, mnt / "run", {"name": "full"}, max_steps=6, checkpoint_every=1,
                        num_threads=1, lr=1e-3)
    recipe_path = tmp_path / "full.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    save, how = _run_on_small_disk(tmp_path, recipe_path, mnt)

    err = (save / "first.err").read_text()
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[peftlab]")]
    assert (save / "first.rc").read_text().strip() == "3", err[-3000:]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert "No space left on device" in lines[0] and "Last good checkpoint: " in lines[0], lines[0]
    last = lines[0].split("Last good checkpoint: ")[1].split(";")[0]
    assert last != "none", lines[0]
    kept = list_checkpoints(save / "after_failure" / "checkpoints")
    assert kept and kept[-1].name == os.path.basename(last), (kept, last)
    state = load_checkpoint(kept[-1])  # complete and readable
    assert state["state"]["step"] >= 1
    assert not (save / "after_failure" / "metrics.json").exists()
    assert "stopped: output.dir: cannot write" in (save / "after_failure" / "train.log").read_text()

    resumed_err = (save / "resumed.err").read_text()
    assert (save / "resumed.rc").read_text().strip() == "0", f"({how})\n{resumed_err[-3000:]}"
    metrics = json.loads((save / "resumed" / "metrics.json").read_text())
    assert metrics["steps"] == 6
