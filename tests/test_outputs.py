"""Output folders: --overwrite deletes only what peftlab made and never a source, one writer per
run folder, and no leftover of a killed write blocks or pollutes the next one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

import peftlab
from conftest import ner_recipe, run_cli
from peftlab.atomicio import TMP_PREFIX, remove_stale_temporaries
from peftlab.outputs import LOCK, MARKER
from test_resume import sigkill, start_train, wait_until, write_recipe

LORA = {"name": "lora", "r": 4}


def one_line_error(res, fragment: str, code: int = 2) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-3000:]
    assert fragment in lines[0], lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def finished_run(tiny_bert, wnut_small, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run = runs / "r1"
    peftlab.train(ner_recipe(tiny_bert, wnut_small, run, LORA, max_steps=2, num_threads=1))
    (runs / "r2").mkdir()
    (runs / "r2" / "notes.txt").write_text("a sibling the user keeps")
    return run


def test_merge_out_holding_the_run_is_refused_and_nothing_is_deleted(finished_run):
    runs = finished_run.parent
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    res = run_cli("merge", str(finished_run), "--out", str(runs), "--overwrite", timeout=300)
    one_line_error(res, f"--out: {runs} holds the run folder {finished_run}; choose a folder outside it")
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before


def test_overwrite_replaces_only_peftlab_folders(finished_run, tiny_bert, wnut_small, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    recipe = write_recipe(tmp_path / "r.yaml", ner_recipe(tiny_bert, wnut_small, mine, LORA, max_steps=1))
    res = run_cli("train", str(recipe), "--overwrite", timeout=300)
    one_line_error(res, f"output.dir: {mine} was not made by peftlab (no {MARKER}); --overwrite replaces only")
    assert (mine / "thesis.tex").read_text() == "years of work"

    res = run_cli("merge", str(finished_run), "--out", str(mine), "--overwrite", timeout=300)
    one_line_error(res, f"--out: {mine} was not made by peftlab")
    assert (mine / "thesis.tex").is_file()


def test_output_dir_holding_the_data_is_refused_even_with_overwrite(tiny_bert, wnut_small, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = {}
    for key, src in wnut_small.items():
        files[key] = str(data / f"{key}.conll")
        (data / f"{key}.conll").write_bytes(open(src, "rb").read())
    (data / MARKER).write_text("{}")  # even a folder that looks like peftlab's
    recipe = write_recipe(tmp_path / "r.yaml", ner_recipe(tiny_bert, files, data, LORA, max_steps=1))
    res = run_cli("train", str(recipe), "--overwrite", timeout=300)
    one_line_error(res, f"output.dir: {data} holds the data file data.train {files['train']}")
    assert sorted(p.name for p in data.iterdir()) == sorted(["train.conll", "validation.conll", "test.conll", MARKER])


def test_symlinked_file_and_under_a_file_outputs_are_one_line(tiny_bert, wnut_small, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(link, f"output.dir: {link} is a symbolic link; give the folder itself"),
             (a_file, f"output.dir: {a_file} is a file, not a folder"),
             (a_file / "run", f"output.dir: {a_file} is a file, so {a_file / 'run'} cannot be a folder under it")]
    for out, expected in cases:
        recipe = write_recipe(tmp_path / "r.yaml", ner_recipe(tiny_bert, wnut_small, out, LORA, max_steps=1))
        one_line_error(run_cli("train", str(recipe), "--overwrite", timeout=300), expected)
    assert a_file.read_text() == "x" and list(real.iterdir()) == []


def test_second_writer_is_refused_while_the_first_runs(tiny_bert, wnut_small, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", ner_recipe(tiny_bert, wnut_small, run, LORA, max_steps=6,
                                                          checkpoint_every=2, num_threads=1))
    marker = tmp_path / "paused"
    first = start_train(recipe, fault="pause_after_checkpoint:2", marker=marker, log=tmp_path / "first.log")
    try:
        wait_until(marker.exists, first, tmp_path / "first.log")
        for args in ((), ("--overwrite",), ("--resume",)):
            res = run_cli("train", str(recipe), *args, timeout=300)
            one_line_error(res, f"output.dir: {run} is in use by another peftlab process (pid {first.pid}); "
                                "wait for it to finish or choose another folder")
    finally:
        sigkill(first)
    assert (run / LOCK).is_file()  # the killed holder's lock file stays, but the kernel released its lock
    res = run_cli("train", str(recipe), "--resume", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "metrics.json").is_file()


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_next(tiny_bert, wnut_small, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", ner_recipe(tiny_bert, wnut_small, run, LORA, max_steps=2,
                                                          num_threads=1))
    peftlab.train(yaml.safe_load(recipe.read_text()))
    for name in ("metrics.json", "params.json", "resources.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "model")  # what a crash in the first epoch leaves: recipe, labels, log, marker
    res = run_cli("train", str(recipe), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held a run that stopped before its first checkpoint; replaced" in res.stderr
    assert (run / "metrics.json").is_file()


def test_leftovers_of_killed_writers_are_removed_unless_the_writer_lives(tmp_path):
    dead, alive = dead_pid(), os.getppid()  # pytest's parent runs; our own PID would count as stale
    stale = [f"{TMP_PREFIX}merged.{dead}-abc123", f"{TMP_PREFIX}merged.old-{dead}", f"{TMP_PREFIX}merged.x9"]
    live = f"{TMP_PREFIX}merged.{alive}-def456"
    other = f"{TMP_PREFIX}other.{dead}-abc123"
    for name in stale + [live, other]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"unverified")
    remove_stale_temporaries(tmp_path, name="merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, other])
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live]


def test_merge_cleans_the_leftover_of_a_killed_merge(finished_run, tmp_path):
    out = tmp_path / "merged"
    leftover = tmp_path / f"{TMP_PREFIX}merged.{dead_pid()}-k1ll3d"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    res = run_cli("merge", str(finished_run), "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not leftover.exists()
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    res = run_cli("merge", str(finished_run), "--out", str(out), "--overwrite", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]  # its own earlier output is peftlab's: replaced


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    """A kill during the delete of an old checkpoint leaves a temporary, never a half step-* folder."""
    from peftlab import checkpoint

    for step in (1, 2, 3):
        folder = tmp_path / f"step-{step:06d}"
        folder.mkdir()
        (folder / "state.json").write_text("{}")
        (folder / "trainable.safetensors").write_bytes(b"x")
    deleted, rmtree = [], shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda p, **k: deleted.append(p.name))  # "killed" here
    checkpoint.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000003"]
    assert all(name.startswith(TMP_PREFIX) for name in deleted) and len(deleted) == 2
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]
