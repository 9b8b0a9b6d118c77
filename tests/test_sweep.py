"""Sweeps and bench cells on Ray: `peftlab sweep` through a Ray head on 127.0.0.1 and
`peftlab bench --executor ray` record what the local executor records for the same cells; ASHA
ends a trailing trial early and the report shows the search."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import yaml

from conftest import ROOT, free_port, ner_recipe, run_cli
from peftlab.bench.plan import plan_bench
from peftlab.bench.records import read_records

TRAIN = dict(batch_size=16, max_steps=6, eval_steps=2, metric="loss", num_threads=1, group_by_length=False)


def write_spec(root, tiny_bert, wnut_small, methods, **extra):
    recipe = root / "tiny_ner.yaml"
    recipe.write_text(yaml.safe_dump(ner_recipe(tiny_bert, wnut_small, root / "unused", {"name": "lora", "r": 4}, **TRAIN)))
    spec = {"name": "sweep", "recipe": str(recipe), "seeds": [1], "sample_seed": 7, "predict_memory": False,
            "methods": methods, **extra}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


FOUR = [{"name": "lora", "sample": {"train.lr": {"loguniform": [1e-3, 3e-2]}}, "samples": 2, "grid": {"method.r": [2, 4]}}]


def run(*args, env=None, timeout=900):
    res = run_cli(*args, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def rows(results):
    """What each record says about the trained model (not time or machine)."""
    out = {}
    for r in read_records(results / "results.jsonl"):
        out[r["cell"]] = {k: r.get(k) for k in ("status", "config", "axes", "overrides", "recipe_hash", "dev", "test",
                                                "best_step", "steps", "params")}
    return out


def report_rows(results):
    with open(results / "report.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not any(w in k for w in ("time", "per_s", "rss", "mib", "wall", "load"))}
                for row in csv.DictReader(fh)]


def test_sampled_configurations_are_drawn_once_from_the_seed(tmp_path, tiny_bert, wnut_small):
    plan = plan_bench(write_spec(tmp_path, tiny_bert, wnut_small, FOUR))
    again = plan_bench(tmp_path / "sweep.yaml")
    assert [c.id for c in plan.cells] == [c.id for c in again.cells] == [
        "lora-000-r=2-s1", "lora-000-r=4-s1", "lora-001-r=2-s1", "lora-001-r=4-s1"]
    lrs = [c.axes["train.lr"] for c in plan.cells]
    assert lrs[0] == lrs[1] != lrs[2] == lrs[3] and all(1e-3 <= lr <= 3e-2 for lr in lrs)
    assert [c.overrides == again.cells[i].overrides for i, c in enumerate(plan.cells)] == [True] * 4


def test_sweep_through_a_ray_head_and_bench_on_ray_record_what_the_local_bench_records(tmp_path, tiny_bert, wnut_small):
    spec = write_spec(tmp_path, tiny_bert, wnut_small, FOUR)
    run("bench", str(spec), "--results", str(tmp_path / "local"), "--work", str(tmp_path / "work-local"))
    port = free_port()
    # a throw-away head on the loopback interface: Ray's token authentication off for it and its clients
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    head = subprocess.run([*ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                           "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert head.returncode == 0, head.stderr[-3000:]
    try:
        address = f"127.0.0.1:{port}"
        run("sweep", str(spec), "--address", address, "--results", str(tmp_path / "sweep"),
            "--work", str(tmp_path / "work-sweep"), env=env)
        run("bench", str(spec), "--executor", "ray", "--address", address, "--results", str(tmp_path / "on-ray"),
            "--work", str(tmp_path / "work-ray"), "--only", "lora-000*", env=env)  # two of the four
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
    local = rows(tmp_path / "local")
    assert len(local) == 4 and all(r["status"] == "ok" for r in local.values())
    assert rows(tmp_path / "sweep") == local
    on_ray = rows(tmp_path / "on-ray")
    assert sorted(on_ray) == ["lora-000-r=2-s1", "lora-000-r=4-s1"] and on_ray == {c: local[c] for c in on_ray}
    ran = [r for r in report_rows(tmp_path / "on-ray") if r["config"].startswith("lora-000")]
    assert len(ran) == 2 and ran == [r for r in report_rows(tmp_path / "local") if r["config"].startswith("lora-000")]
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Search" in md and "train.lr" in md and (tmp_path / "sweep" / "search_train.lr.png").is_file()


def test_asha_stops_a_trailing_trial_and_records_it_as_stopped(tmp_path, tiny_bert, wnut_small):
    """Trials run one at a time (each takes every core): the second, with a learning rate that cannot
    move the loss, trails the first at the first evaluation and is stopped long before its schedule ends."""
    methods = [{"name": "good", "overrides": ["train.lr=0.02"]},
               {"name": "frozen", "overrides": ["train.lr=1e-9", "train.max_steps=400"]}]
    spec = write_spec(tmp_path, tiny_bert, wnut_small, methods,
                      early_stopping={"grace_evaluations": 1, "reduction_factor": 2})
    res = run("sweep", str(spec), "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"))
    records = {r["config"]: r for r in read_records(tmp_path / "r" / "results.jsonl")}
    assert records["good"]["status"] == "ok" and records["good"]["steps"] == 6
    stopped = records["frozen"]
    assert stopped["status"] == "stopped", stopped.get("error")
    assert 1 <= len(stopped["evaluations"]) < 100 and stopped["dev"]["loss"] > records["good"]["dev"]["loss"]
    assert f"stopped by early stopping after {len(stopped['evaluations'])} evaluation(s)" in stopped["error"]
    assert not (tmp_path / "w" / "cells" / stopped["cell"] / "run" / "metrics.json").exists()
    assert "stopped early" in res.stderr
    assert "Configuration for experiment" not in res.stdout + res.stderr  # Ray Tune's own tables are off
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Stopped early" in md and "Failed cells" not in md
    assert "2 planned, 1 ok, 1 stopped early, 0 failed, 0 missing (complete)" in md
    assert f"`peftlab sweep {spec} --results" in md  # a sweep's report is reproduced by the sweep
    # run again: both are finished (the stopped one too); nothing runs
    again = run("sweep", str(spec), "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"))
    assert "0 to run now" in again.stderr
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["spec"] == "sweep"


def test_without_ray_a_sweep_says_how_to_install_it(tmp_path, tiny_bert, wnut_small):
    spec = write_spec(tmp_path, tiny_bert, wnut_small, FOUR)
    shim = {"PYTHONPATH": str(ROOT / "tests" / "fault_shim"), "PEFTLAB_TEST_HIDE": "ray"}
    res = run_cli("sweep", str(spec), "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"), env=shim)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "peftlab: error: --executor ray / peftlab sweep: Ray is not installed (pip install -e '.[ray]')")


def test_search_table_marks_keys_a_configuration_does_not_vary():
    """Two searches in one spec: the second varies only train.lr, so its trials show "–" for the
    prefix length (their recipe's value ran), and the best line names only what that trial varied."""
    from types import SimpleNamespace

    from peftlab.bench.search import search_lines

    def trial(cell, axes, dev, test):
        return {"cell": cell, "config": cell, "axes": axes, "status": "ok",
                "dev": {"exact_match": dev}, "test": {"exact_match": test}}

    s = SimpleNamespace(metric="exact_match", metric_mode="max", stopped=[], ok=[
        trial("short-000", {"method.num_virtual_tokens": 10, "train.lr": 0.09}, 0.35, 0.34),
        trial("short-001", {"method.num_virtual_tokens": 20, "train.lr": 0.15}, 0.33, 0.31),
        trial("long-lr=0.097", {"train.lr": 0.097}, 0.64, 0.63)])
    md = "\n".join(search_lines(s, {}))
    assert "| long-lr=0.097 | – | 0.097 | 0.6400 | 0.6300 | ok |" in md, md
    assert "| short-001 | 20 | 0.15 | 0.3300 | 0.3100 | ok |" in md, md
    assert "`long-lr=0.097` (train.lr 0.097): dev exact_match 0.6400" in md, md
    assert "None" not in md and "–: not varied in that configuration" in md
