"""The benchmark harness: one process per cell, JSONL records, resumability, report computed from records.

One small bench on the tiny random BERT (2 optimizer steps per cell, 96/48/48-sentence WNUT slices)
is run once per module and inspected by several tests. Its cells: ``head`` (2 seeds), ``lora``,
``ballast`` (a third-party method plugin that holds a 500 MiB tensor), ``broken`` (an unknown method),
``slow`` (stopped by its 2 s ``timeout_s``) and ``baseline-trainer-lora`` (the plain transformers
Trainer script, compared with ``lora``).
"""

from __future__ import annotations

import contextlib
import io
import csv
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, ner_recipe
from peftlab.bench import plan_bench, read_records, run_bench
from peftlab.errors import PeftlabError
from peftlab.system import peak_rss_bytes
from peftlab.bench import write_report

BASELINE = ROOT / "benchmarks" / "baselines" / "trainer_baseline.py"
MIB = 2**20
BALLAST_MIB = 500

PLUGIN = f'''
import torch
from peftlab.methods import register_method
from peftlab.methods.head import HeadOnly


# held from the plugin's import (when the recipe names it) to the process's end, so it is under
# every phase's peak, loading included
BALLAST = torch.ones({BALLAST_MIB} * 2**20 // 4, dtype=torch.float32)


class Ballast(HeadOnly):
    """``head`` in a process that also holds a {BALLAST_MIB} MiB tensor (for the peak-memory test)."""
    name = "ballast"
'''


def write_plugin(folder: Path) -> Path:
    """A method plugin registered the way third-party packages do it: an entry point in a dist-info."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ballast_plugin.py").write_text(PLUGIN)
    dist = folder / "ballast_plugin-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ballast-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[peftlab.methods]\nballast = ballast_plugin:Ballast\n")
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_bert, wnut_small):
    root = tmp_path_factory.mktemp("bench")
    recipe = ner_recipe(tiny_bert, wnut_small, root / "unused", {"name": "head"}, lr=5e-3, eval_batch_size=48)
    recipe_path = root / "tiny_ner.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    plugins = write_plugin(root / "plugins")
    # modules_to_save: the baseline must build the same LoRA as peftlab (count compared below)
    lora = {"name": "lora", "r": 4, "alpha": 8, "modules_to_save": ["embeddings.LayerNorm"]}
    spec = {
        "name": "tiny",
        "description": "tiny random BERT on WNUT-17 slices (test)",
        "recipe": str(recipe_path),
        "seeds": [1, 2, 3],
        "methods": [
            {"name": "head", "method": {"name": "head"}, "seeds": [1, 2]},
            {"name": "lora", "method": lora},
            {"name": "ballast", "method": {"name": "ballast"}, "env": {"PYTHONPATH": str(plugins)}},
            {"name": "broken", "method": {"name": "no_such_method"}},
            {"name": "slow", "method": {"name": "head"}, "timeout_s": 2},
            {"name": "baseline-trainer-lora", "method": lora, "script": str(BASELINE), "compare_to": "lora"},
        ],
        "quick": {"seeds": [1], "overrides": ["train.max_steps=2"]},
    }
    spec_path = root / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results, work = root / "results", root / "work"
    log = root / "bench.log"
    with open(log, "w") as fh:
        summary = run_bench(spec_path, quick=True, results_dir=results, work_dir=work, out=fh)
    return {"spec": spec_path, "results": results, "work": work, "summary": summary, "log": log}


def records_by_cell(results: Path) -> dict:
    return {r["cell"]: r for r in read_records(results / "results.jsonl")}


def test_quick_bench_writes_records_and_report(bench):
    s = bench["summary"]
    expected = {"head-s1", "head-s2", "lora-s1", "ballast-s1", "broken-s1", "slow-s1", "baseline-trainer-lora-s1"}
    assert set(s.ran) == expected, bench["log"].read_text()
    recs = records_by_cell(bench["results"])
    assert set(recs) == expected
    ok = [r for r in recs.values() if r["status"] == "ok"]
    assert len(ok) == 5, {c: r.get("error") for c, r in recs.items()}
    for r in ok:
        assert r["profile"] == "quick" and r["spec_hash"] and r["recipe_hash"] and r["resolved_recipe_hash"]
        assert r["steps"] == 2 and r["best_epoch"] == 1
        assert r["params"]["trainable_params"] > 0 and r["params"]["total_params"] > r["params"]["trainable_params"]
        assert r["params"]["trainable_head_params"] > 0
        assert r["memory"]["peak_rss_bytes"] > 100 * MIB and r["memory"]["parent_peak_rss_bytes"] > 100 * MIB
        assert r["memory"]["load_rss_bytes"] > 0
        assert r["time"]["samples_per_s"] > 0 and r["time"]["tokens_per_s"] > 0 and r["time"]["train_time_s"] > 0
        assert {"f1", "precision", "recall", "accuracy"} <= set(r["test"]) and "f1" in r["dev"]
        assert r["size"]["model_dir_bytes"] > 0
        assert set(r["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
        assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
        assert "git" in r and "commit" in r["git"]
        assert r["load_avg"]["samples"] >= 1 and r["load_avg"]["max"] >= r["load_avg"]["mean"] >= 0
        assert "train.seed=1" in r["overrides"] or "train.seed=2" in r["overrides"]
    assert recs["lora-s1"]["method"] == "lora" and recs["lora-s1"]["method_options"]["r"] == 4
    assert recs["baseline-trainer-lora-s1"]["kind"] == "baseline"
    # peft's own count is recorded where the method builds a peft model, and equals peftlab's
    assert recs["lora-s1"]["params"]["peft_trainable_params"] == recs["lora-s1"]["params"]["trainable_params"]
    assert recs["head-s1"]["params"]["peft_trainable_params"] is None
    md = (bench["results"] / "report.md").read_text()
    assert "against peft's own count (`get_nb_trainable_parameters()` of the peft model, task head included): " \
        "equal for lora;" in md and "no peft model (counted by peftlab alone) for " in md
    assert "counted by the baseline script itself (`requires_grad` parameters) for baseline-trainer-" in md
    # the baseline trains the same LoRA: same trainable backbone parameter count as peftlab's LoRA,
    # the fully trained embeddings.LayerNorm (2 x hidden 32) included
    assert recs["lora-s1"]["params"]["trainable_params_without_head"] == 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64)) + 64
    assert (recs["baseline-trainer-lora-s1"]["params"]["trainable_params_without_head"]
            == recs["lora-s1"]["params"]["trainable_params_without_head"])
    # the JSONL has only whole lines, one record each
    text = (bench["results"] / "results.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 7
    for name in ("report.md", "report.csv", "baseline_comparison.csv", "plan.json",
                 "test_f1_vs_trainable_params.png", "test_f1_vs_peak_memory.png"):
        assert (bench["results"] / name).is_file(), name
    for png in bench["results"].glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # cell work folders live in the work folder, not in the results folder
    assert (bench["work"] / "cells" / "head-s1" / "run" / "metrics.json").is_file()
    assert not list(bench["results"].rglob("metrics.json"))


def test_failing_cell_is_recorded_with_its_error(bench):
    rec = records_by_cell(bench["results"])["broken-s1"]
    assert rec["status"] == "failed" and rec["returncode"] == 2
    assert rec["error"].startswith("peftlab: error:") and "no_such_method" in rec["error"]
    md = (bench["results"] / "report.md").read_text()
    assert "## Failed cells" in md and "no_such_method" in md and "PARTIAL" in md
    slow = records_by_cell(bench["results"])["slow-s1"]
    assert slow["status"] == "failed" and slow["error"] == "timed out after 2s (timeout_s)"
    assert slow["returncode"] == -9 and slow["cell_wall_s"] < 60


def test_peak_memory_is_per_process(bench):
    recs = records_by_cell(bench["results"])
    big, small = recs["ballast-s1"]["memory"], recs["head-s1"]["memory"]
    for key in ("peak_rss_bytes", "parent_peak_rss_bytes"):
        assert big[key] - small[key] > 0.8 * BALLAST_MIB * MIB, (key, big[key], small[key])
    # the cell that ran after the ballast cell does not inherit its peak
    later = recs["baseline-trainer-lora-s1"]["memory"]
    assert later["parent_peak_rss_bytes"] < big["parent_peak_rss_bytes"] - 0.5 * BALLAST_MIB * MIB
    # the parent's wait4 is the larger of the run's own peak and the size of the process that forked
    # the cell (here this test process, not a small `peftlab bench`), the two counted a little
    # differently: it agrees with the run's own VmHWM where the run peaked above this process's
    # peak, and is at most about that size elsewhere
    forker = peak_rss_bytes()
    checked = 0
    for m in (r["memory"] for r in recs.values() if r.get("memory")):
        own, parent = m["peak_rss_bytes"], m["parent_peak_rss_bytes"]
        assert 0.9 * own <= parent <= 1.1 * max(own, forker), (own, parent, forker)
        checked += own > forker
    assert checked >= 1  # the ballast cell at least


def _recomputed(recs: list[dict], get) -> tuple:
    vals = [get(r) for r in recs]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


CHECKS = {  # csv key -> (markdown header, how to read the value from a record)
    "test_f1": ("test f1", lambda r: r["test"]["f1"]),
    "test_accuracy": ("test accuracy", lambda r: r["test"]["accuracy"]),
    "dev_f1": ("dev f1", lambda r: r["dev"]["f1"]),
    "trainable_params": ("trainable params", lambda r: r["params"]["trainable_params"]),
    "trainable_pct": ("trainable %", lambda r: r["params"]["trainable_pct"]),
    "peak_rss_mib": ("peak RSS (MiB)", lambda r: r["memory"]["peak_rss_bytes"] / MIB),
    "train_time_s": ("train time (s)", lambda r: r["time"]["train_time_s"]),
    "samples_per_s": ("samples/s", lambda r: r["time"]["samples_per_s"]),
    "tokens_per_s": ("tokens/s", lambda r: r["time"]["tokens_per_s"]),
    "size_mib": ("saved size (MiB)", lambda r: r["size"]["model_dir_bytes"] / MIB),
}


def parse_markdown_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| configuration")]
    start = md.splitlines().index(lines[0])
    rows = []
    for ln in md.splitlines()[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return [c.strip() for c in lines[0].strip("|").split("|")], rows


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def test_report_numbers_are_computed_from_the_jsonl(bench):
    recs = [r for r in read_records(bench["results"] / "results.jsonl") if r["status"] == "ok"]
    by_config: dict[str, list] = {}
    for r in recs:
        by_config.setdefault(r["config"], []).append(r)
    assert len(by_config["head"]) == 2  # mean ± std over two seeds

    with open(bench["results"] / "report.csv", newline="") as fh:
        rows = {row["config"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"head", "lora", "ballast", "broken", "slow", "baseline-trainer-lora"}
    assert rows["broken"]["seeds_ok"] == "0" and rows["head"]["seeds_ok"] == "2"
    headers, md_rows = parse_markdown_table((bench["results"] / "report.md").read_text())
    md = {row[0]: dict(zip(headers, row)) for row in md_rows}
    assert list(md) == ["head", "lora", "ballast", "broken", "slow", "baseline-trainer-lora"]  # spec order
    assert md["head"]["seeds"] == "2/2" and md["broken"]["seeds"] == "0/1"

    for config, group in by_config.items():
        for key, (header, get) in CHECKS.items():
            mean, std, n = _recomputed(group, get)
            assert float(rows[config][f"{key}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-12), (config, key)
            assert int(rows[config][f"{key}_n"]) == n
            if std is None:
                assert rows[config][f"{key}_std"] == ""
            else:
                assert float(rows[config][f"{key}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-12), (config, key)
            shown = md[config][header]
            parts = [p.strip() for p in shown.split("±")]
            assert len(parts) == (2 if std is not None else 1), (config, header, shown)
            for text, value in zip(parts, (mean, std)):
                assert abs(_number(text) - value) <= 0.5 * 10 ** -_decimals(text) + 1e-12, (config, header, shown, value)


def test_report_header_and_baseline_comparison(bench):
    md = (bench["results"] / "report.md").read_text()
    spec = bench["spec"]
    assert f"`peftlab bench {spec} --quick --results {bench['results']} --work {bench['work']}`" in md
    assert re.search(r"\*\*Machine:\*\* .+ \(\d+ cores", md)
    assert re.search(r"\*\*Machine load while the cells ran:\*\* 1-minute load average [\d.]+–[\d.]+", md)
    assert "**Versions:** " in md and "torch " in md and "bitsandbytes " in md
    assert "Cells:** 7 planned, 5 ok, 2 failed, 0 missing" in md
    recs = records_by_cell(bench["results"])
    ours, base = recs["lora-s1"], recs["baseline-trainer-lora-s1"]
    with open(bench["results"] / "baseline_comparison.csv", newline="") as fh:
        (comp,) = list(csv.DictReader(fh))
    assert comp["peftlab"] == "lora" and comp["baseline"] == "baseline-trainer-lora"
    assert float(comp["samples_per_s_ratio"]) == pytest.approx(
        ours["time"]["samples_per_s"] / base["time"]["samples_per_s"], rel=1e-12)
    assert float(comp["test_f1_diff"]) == pytest.approx(ours["test"]["f1"] - base["test"]["f1"], abs=1e-12)
    assert "## peftlab vs a plain transformers Trainer script" in md


def test_comparison_across_machines_gives_no_speed_ratio(bench, tmp_path):
    """A spec finished over several sessions may hold a peftlab cell and its Trainer baseline from two
    machines: the metric difference still holds, a throughput or memory ratio would not."""
    shutil.copy(bench["results"] / "plan.json", tmp_path / "plan.json")
    lines = (bench["results"] / "results.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        if rec["cell"] == "baseline-trainer-lora-s1":
            rec["machine"] = {**rec["machine"], "cpu": "Other CPU"}
        out.append(json.dumps(rec))
    (tmp_path / "results.jsonl").write_text("\n".join(out) + "\n")
    write_report(tmp_path / "results.jsonl")
    with open(tmp_path / "baseline_comparison.csv", newline="") as fh:
        (comp,) = list(csv.DictReader(fh))
    assert comp["samples_per_s_ratio"] == comp["peak_rss_ratio"] == "" and comp["machine_count"] == "2"
    recs = records_by_cell(bench["results"])
    assert float(comp["test_f1_diff"]) == pytest.approx(
        recs["lora-s1"]["test"]["f1"] - recs["baseline-trainer-lora-s1"]["test"]["f1"], abs=1e-12)
    md = (tmp_path / "report.md").read_text()
    assert "lora vs baseline-trainer-lora: their cells ran on different machines (" in md
    assert "Other CPU" in md and "**Machines:** " in md
    # on one machine (the bench's own report) the ratio is there and nothing is said
    with open(bench["results"] / "baseline_comparison.csv", newline="") as fh:
        (same,) = list(csv.DictReader(fh))
    assert same["samples_per_s_ratio"] and same["machine_count"] == "1"
    assert "different machines" not in (bench["results"] / "report.md").read_text()
    # a peftlab configuration whose own seeds ran on two machines, its baseline not run yet: no note
    plan = json.loads((bench["results"] / "plan.json").read_text())
    lora = next(c for c in plan["cells"] if c["cell"] == "lora-s1")
    plan["cells"].append({**lora, "cell": "lora-s2", "seed": 2})
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    kept = [json.loads(line) for line in lines if "baseline-trainer" not in line]
    one = next(r for r in kept if r["cell"] == "lora-s1")
    kept.append({**one, "cell": "lora-s2", "seed": 2, "machine": {**one["machine"], "cpu": "Other CPU"}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    write_report(tmp_path / "results.jsonl")
    md = (tmp_path / "report.md").read_text()
    assert "| lora | lora | none | 2/" in md and "Other CPU" in md  # both seeds counted, two machines
    assert "different machines" not in md


def test_records_of_an_older_recipe_are_listed_not_averaged(bench, tmp_path):
    """A cell recorded before its recipe (or baseline script) changed stays in the JSONL until the bench
    re-runs it; the report must not average it with current cells nor compare against it."""
    plan = json.loads((bench["results"] / "plan.json").read_text())
    for cell in plan["cells"]:
        if cell["cell"] == "baseline-trainer-lora-s1":
            cell["recipe_hash"] = "0000000000000000"  # as if the script changed after the cell ran
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    shutil.copy(bench["results"] / "results.jsonl", tmp_path / "results.jsonl")
    write_report(tmp_path / "results.jsonl")
    md = (tmp_path / "report.md").read_text()
    assert ("Cells:** 7 planned, 4 ok, 2 failed, 0 missing, 1 recorded with an older recipe (not in the tables) "
            "(**PARTIAL**)") in md
    assert "## Cells recorded with an older recipe" in md and "`baseline-trainer-lora-s1`" in md
    headers, rows = parse_markdown_table(md)
    row = {r[0]: dict(zip(headers, r)) for r in rows}["baseline-trainer-lora"]
    assert row["seeds"] == "0/1"
    with open(tmp_path / "report.csv", newline="") as fh:
        csv_row = next(r for r in csv.DictReader(fh) if r["config"] == "baseline-trainer-lora")
    assert csv_row["seeds_ok"] == "0" and csv_row["test_f1_mean"] == ""
    with open(tmp_path / "baseline_comparison.csv", newline="") as fh:
        assert not [r for r in csv.DictReader(fh) if r.get("test_f1_diff")]  # nothing to compare with


def _snapshot(bench) -> dict:
    return {p.name: p.read_bytes() for p in bench["results"].iterdir() if p.name != "results.jsonl"}


def _log_mtimes(bench) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (bench["work"] / "cells").glob("*/stdout.log")}


def test_rerun_does_no_training_and_reproduces_the_report(bench, tmp_path):
    before, mtimes = _snapshot(bench), _log_mtimes(bench)
    with open(tmp_path / "log", "w") as fh:
        again = run_bench(bench["spec"], quick=True, results_dir=bench["results"], work_dir=bench["work"],
                          skip_failed=True, out=fh)
    assert again.ran == [] and again.harvested == []
    assert _log_mtimes(bench) == mtimes  # no cell process started
    assert _snapshot(bench) == before  # the same report, byte for byte (PNGs included)
    # `peftlab report` alone writes the same files
    from peftlab.cli import main

    out = tmp_path / "report"
    assert main(["report", str(bench["results"] / "results.jsonl"), "--out", str(out)]) == 0
    for name in ("report.md", "report.csv", "test_f1_vs_trainable_params.png"):
        assert (out / name).read_bytes() == before[name], name
    # ...and so do the plain Python calls
    from peftlab.api import bench as api_bench, report as api_report

    api_report(bench["results"] / "results.jsonl", tmp_path / "report2")
    assert (tmp_path / "report2" / "report.md").read_bytes() == before["report.md"]
    with open(tmp_path / "log1", "w") as fh:
        assert api_bench(bench["spec"], quick=True, results_dir=bench["results"], work_dir=bench["work"],
                         skip_failed=True, out=fh).ran == []
    # without --skip-failed the failed cells (and only they) are tried again
    with open(tmp_path / "log2", "w") as fh:
        retry = run_bench(bench["spec"], quick=True, results_dir=bench["results"], work_dir=bench["work"], out=fh)
    failed = ["broken-s1", "slow-s1"]
    assert retry.ran == failed and retry.failed == failed
    assert {k: v for k, v in _log_mtimes(bench).items() if k not in failed} == {
        k: v for k, v in mtimes.items() if k not in failed}
    assert _snapshot(bench)["report.md"] == before["report.md"]


def _train_children(pid: int) -> list[int]:
    """Child processes of ``pid`` running `peftlab.cli train` (the bench's cell processes)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for kid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"\0train\0" in Path(f"/proc/{kid}/cmdline").read_bytes():
                        kids.append(int(kid))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_killed_bench_runs_only_the_missing_cells(bench, tmp_path):
    jsonl = bench["results"] / "results.jsonl"
    recs = read_records(jsonl)
    # as if the bench had died right after lora-s1 finished (run folder complete, no record yet), with
    # a half-written line at the end of the file
    kept = [r for r in recs if r["cell"] not in ("head-s2", "lora-s1")]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"cell": "head-s2", "status": "o')
    (bench["work"] / "cells" / "head-s2" / "run" / "metrics.json").unlink()  # head-s2 must train again
    mtimes = _log_mtimes(bench)
    # a real bench process is killed (SIGKILL) while head-s2 trains; its cell process dies with it
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "bench", str(bench["spec"]), "--quick", "--only", "head",
         "--results", str(bench["results"]), "--work", str(bench["work"]), "--skip-failed"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "w"),
    )
    deadline = time.monotonic() + 300
    kids: list[int] = []
    while not kids and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        kids = _train_children(proc.pid)
    assert kids, (tmp_path / "killed.log").read_text()
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(k) for k in kids), "the cell process outlived the killed bench"
    assert "head-s2" not in records_by_cell(bench["results"])
    assert not (bench["work"] / "cells" / "head-s2" / "run" / "metrics.json").exists()

    with open(tmp_path / "log", "w") as fh:
        summary = run_bench(bench["spec"], quick=True, results_dir=bench["results"], work_dir=bench["work"],
                            skip_failed=True, out=fh)
    assert summary.ran == ["head-s2"], (tmp_path / "log").read_text()
    assert summary.harvested == ["lora-s1"]
    after = _log_mtimes(bench)
    assert after["head-s2"] > mtimes["head-s2"]
    assert {k: v for k, v in after.items() if k != "head-s2"} == {k: v for k, v in mtimes.items() if k != "head-s2"}
    new = records_by_cell(bench["results"])
    assert set(new) == {r["cell"] for r in recs} and new["head-s2"]["status"] == "ok"
    assert new["lora-s1"]["harvested"]
    assert new["lora-s1"]["test"] == next(r for r in recs if r["cell"] == "lora-s1")["test"]
    assert jsonl.read_text().endswith("}\n")  # the half line is gone: the file is rewritten whole
    # the same seed on the same machine trains to the same numbers
    old = next(r for r in recs if r["cell"] == "head-s2")
    assert new["head-s2"]["test"]["f1"] == pytest.approx(old["test"]["f1"], abs=1e-9)


def test_rerun_option_trains_the_chosen_finished_cells_again(bench, tmp_path):
    """--rerun PATTERN (after a code change): the matching finished cells train again from scratch
    (their earlier run folders are neither recorded again nor resumed) and replace their records;
    every other cell is left alone."""
    jsonl = bench["results"] / "results.jsonl"
    old, mtimes = records_by_cell(bench["results"]), _log_mtimes(bench)
    with open(tmp_path / "list", "w") as fh:
        run_bench(bench["spec"], quick=True, results_dir=bench["results"], work_dir=bench["work"], skip_failed=True,
                  rerun=["head-s1"], list_only=True, out=fh)
    listed = (tmp_path / "list").read_text()
    assert re.search(r"head-s1 +to run", listed) and re.search(r"lora-s1 +ok", listed), listed
    assert records_by_cell(bench["results"]) == old and _log_mtimes(bench) == mtimes  # --list runs nothing
    with open(tmp_path / "log", "w") as fh:
        summary = run_bench(bench["spec"], quick=True, results_dir=bench["results"], work_dir=bench["work"],
                            skip_failed=True, rerun=["head-s1"], out=fh)
    log = (tmp_path / "log").read_text()
    assert summary.ran == ["head-s1"] and summary.harvested == [], log
    # while it runs again, the re-run cell is not counted as done
    n_ok = sum(1 for r in old.values() if r["status"] == "ok")
    assert re.search(rf"\[{n_ok - 1}/\d+ done(, \d+ failed)?; this run: 0/1 done, 1 left, ETA [^\]]+\] cell head-s1", log), log
    after, new = _log_mtimes(bench), records_by_cell(bench["results"])
    assert after["head-s1"] > mtimes["head-s1"]
    assert {k: v for k, v in after.items() if k != "head-s1"} == {k: v for k, v in mtimes.items() if k != "head-s1"}
    assert set(new) == set(old) and new["head-s1"]["status"] == "ok"
    assert new["head-s1"]["started_at"] >= old["head-s1"]["started_at"] and not new["head-s1"].get("harvested")
    assert {k: v for k, v in new.items() if k != "head-s1"} == {k: v for k, v in old.items() if k != "head-s1"}
    assert new["head-s1"]["test"]["f1"] == pytest.approx(old["head-s1"]["test"]["f1"], abs=1e-9)  # same seed
    assert jsonl.read_text().count('"cell": "head-s1"') == 1


def test_a_record_of_an_older_recipe_is_not_counted_done(bench, tmp_path):
    """While other cells run, a cell recorded before its recipe changed is to run again: the progress
    line must not count it as done."""
    results = tmp_path / "results"
    results.mkdir()
    recs = read_records(bench["results"] / "results.jsonl")
    for r in recs:
        if r["cell"] == "lora-s1":
            r["recipe_hash"] = "0000000000000000"  # as if the recipe changed after the cell ran
    (results / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with open(tmp_path / "log", "w") as fh:
        run_bench(bench["spec"], quick=True, results_dir=results, work_dir=tmp_path / "work", only=["head-s1"],
                  rerun=["head-s1"], report=False, out=fh)
    log = (tmp_path / "log").read_text()
    n_ok = sum(1 for r in recs if r["status"] == "ok" and r["cell"] not in ("lora-s1", "head-s1"))
    assert "will run again (lora-s1)" in log, log
    assert re.search(rf"\[{n_ok}/\d+ done(, \d+ failed)?; this run: 0/1 done", log), log


def test_gpu_memory_columns_when_records_have_them(bench, tmp_path):
    """Records of GPU runs carry torch.cuda max allocated/reserved: the report shows and plots them."""
    recs = [r for r in read_records(bench["results"] / "results.jsonl") if r["status"] == "ok"]
    for i, r in enumerate(recs):
        r["memory"]["cuda_max_memory_allocated_bytes"] = (i + 1) * 100 * MIB
        r["memory"]["cuda_max_memory_reserved_bytes"] = (i + 1) * 128 * MIB
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_report(tmp_path / "results.jsonl")
    headers, rows = parse_markdown_table((tmp_path / "report.md").read_text())
    assert "GPU max allocated (MiB)" in headers and "GPU max reserved (MiB)" in headers
    md = {row[0]: dict(zip(headers, row)) for row in rows}
    lora = next(i for i, r in enumerate(recs) if r["cell"] == "lora-s1")
    assert md["lora"]["GPU max allocated (MiB)"] == str((lora + 1) * 100)
    assert (tmp_path / "test_f1_vs_peak_memory.png").is_file()
    assert "Missing cells" not in (tmp_path / "report.md").read_text()  # no plan.json here: nothing planned


def test_reference_ratios_divide_by_the_reference_configuration(bench, tmp_path):
    """A spec's `reference` adds a table of each configuration's throughput and memory divided by the
    reference's, computed from the records; without one the report has no such table."""
    plan = json.loads((bench["results"] / "plan.json").read_text())
    assert "reference" not in plan and "## Ratios to" not in (bench["results"] / "report.md").read_text()
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "reference": "head"}))
    shutil.copy(bench["results"] / "results.jsonl", tmp_path / "results.jsonl")
    write_report(tmp_path / "results.jsonl")
    md = (tmp_path / "report.md").read_text()
    assert "## Ratios to `head`" in md
    recs = [r for r in read_records(bench["results"] / "results.jsonl") if r["status"] == "ok"]
    head = [r for r in recs if r["config"] == "head"]
    lora = [r for r in recs if r["config"] == "lora"]
    mean = lambda rs, *k: statistics.mean(r[k[0]][k[1]] for r in rs)  # noqa: E731
    row = next(line for line in md.splitlines() if line.startswith("| lora |") and line.count("|") == 6)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{mean(lora, 'time', 'samples_per_s') / mean(head, 'time', 'samples_per_s'):.2f}"
    assert cells[3] == f"{mean(lora, 'memory', 'peak_rss_bytes') / mean(head, 'memory', 'peak_rss_bytes'):.2f}"
    assert next(line for line in md.splitlines() if line.startswith("| head |") and line.count("|") == 6) == \
        "| head | 1.00 | 1.00 | 1.00 | 1.00 |"


def test_efficiency_specs_plan():
    for name in ("efficiency_minilm", "efficiency_smollm2"):
        spec = ROOT / "benchmarks" / f"{name}.yaml"
        full = plan_bench(spec)
        assert full.spec.reference == "full" and {c.config for c in full.cells} >= {"full", "lora", "nf4-qlora", "int8-lora"}
        assert all(c.seed == 42 for c in full.cells)
        assert any("method.fast_path=false" in c.overrides for c in full.cells)
        quick = plan_bench(spec, quick=True)
        assert {c.config for c in quick.cells} == {"full", "lora"}
    minilm = ROOT / "benchmarks" / "efficiency_minilm.yaml"
    configs, rounds = [c.config for c in plan_bench(minilm).cells], plan_bench(minilm, profile_name="rounds").cells
    n = len(configs)
    assert [c.seed for c in rounds] == [42] * n + [43] * n + [44] * n
    assert [c.config for c in rounds] == configs * 3


def test_order_seed_runs_every_configuration_once_per_round(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("seeds: [1, 2]\nmethods:\n  - {name: a, recipe: r.yaml}\n  - {name: b, recipe: r.yaml}\n"
                    "  - {name: c, recipe: r.yaml, seeds: [5]}\nprofiles:\n  rounds: {order: seed}\n")
    assert [c.id for c in plan_bench(spec).cells] == ["a-s1", "a-s2", "b-s1", "b-s2", "c-s5"]
    rounds = plan_bench(spec, profile_name="rounds").cells
    assert [c.id for c in rounds] == ["a-s1", "b-s1", "c-s5", "a-s2", "b-s2"]
    assert [c.order for c in rounds] == [0, 1, 2, 3, 4]
    spec.write_text(spec.read_text().replace("seeds: [1, 2]", "seeds: [1, 2]\norder: seed"))
    assert [c.id for c in plan_bench(spec).cells] == ["a-s1", "b-s1", "c-s5", "a-s2", "b-s2"]
    spec.write_text(spec.read_text().replace("order: seed", "order: seeds"))
    with pytest.raises(PeftlabError, match=r"s.yaml:2: order: .*'configuration' or 'seed'"):
        plan_bench(spec)


def test_real_specs_plan(tmp_path):
    for name, n_configs in (("wnut17_minilm", 14), ("banking77_minilm", 11), ("banking77_minilm_fulltrain", 4)):
        spec = ROOT / "benchmarks" / f"{name}.yaml"
        full = plan_bench(spec)
        quick = plan_bench(spec, quick=True)
        assert len({c.config for c in full.cells}) == n_configs
        assert len(full.cells) == 3 * n_configs and sorted({c.seed for c in full.cells}) == [42, 43, 44]
        assert len(quick.cells) == n_configs and all(any(o.startswith("train.max_steps=") for o in c.overrides)
                                                     for c in quick.cells)
        assert full.results_dir == spec.parent / "results" / name
        assert quick.results_dir.parts[-3:] == ("work", f"{name}-quick", "results")
        assert full.spec_hash != quick.spec_hash
        assert {c.kind for c in full.cells} == {"peftlab", "baseline"}
        assert all(c.compare_to for c in full.cells if c.kind == "baseline")
    banking = plan_bench(ROOT / "benchmarks" / "banking77_minilm.yaml")
    assert all("data.max_train_samples=3000" in c.overrides for c in banking.cells)
    fulltrain = plan_bench(ROOT / "benchmarks" / "banking77_minilm_fulltrain.yaml")
    assert not any(o.startswith("data.max_train_samples=") for c in fulltrain.cells for o in c.overrides)


def test_spec_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: r.yaml\nmethods:\n  - name: lora\n    overides: [train.lr=1]\n")
    with pytest.raises(PeftlabError, match=r"bad.yaml:4: methods.0.overides: unknown key \(did you mean 'methods.0.overrides'\?\)"):
        plan_bench(bad)
    bad.write_text("methods:\n  - {name: a, recipe: r.yaml}\n  - {name: a, recipe: r.yaml}\n")
    with pytest.raises(PeftlabError, match="configuration name 'a' is used twice"):
        plan_bench(bad)
    bad.write_text("methods:\n  - {name: a, recipe: r.yaml}\n")
    with pytest.raises(PeftlabError, match="--quick needs a `quick:` section"):
        plan_bench(bad, quick=True)
    # a missing recipe is the cell's problem (recorded as failed without starting a process)
    plan = plan_bench(bad)
    assert "recipe file not found" in plan.cells[0].problem


def test_records_call_the_code_dirty_only_for_changes_that_can_change_a_result(tmp_path):
    from peftlab.bench import git_info

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    files = {"peftlab/x.py": "a = 1\n", "recipes/r.yaml": "a: 1\n", "README.md": "doc\n",
             "tests/test_x.py": "pass\n", "benchmarks/results/s/results.jsonl": "{}\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    assert git_info(tmp_path)["dirty"] is False
    for rel in ("README.md", "tests/test_x.py", "benchmarks/results/s/results.jsonl"):
        (tmp_path / rel).write_text("changed\n")
    assert git_info(tmp_path)["dirty"] is False
    (tmp_path / "recipes/r.yaml").write_text("a: 2\n")
    assert git_info(tmp_path)["dirty"] is True
    git("checkout", "--", "recipes/r.yaml")
    (tmp_path / "peftlab/x.py").write_text("a = 2\n")
    assert git_info(tmp_path)["dirty"] is True


def test_trainer_baseline_evaluates_in_dataset_order_while_training_grouped_by_length(tiny_bert, tmp_path):
    # transformers 5.x length-groups the evaluation sampler too when training groups by length; the
    # baseline scores predictions against its dataset rows by position, so it must evaluate in order
    import importlib.util

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    spec = importlib.util.spec_from_file_location("trainer_baseline", BASELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    n = 64
    ds = Dataset.from_dict({"input_ids": [[101] + [1000 + i] * (1 + (i * 37) % 30) + [102] for i in range(n)],
                            "label": [i % 3 for i in range(n)]})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to="none",
                             train_sampling_strategy="group_by_length", use_cpu=True)

    def lengths_seen(trainer_cls):
        trainer = trainer_cls(model=model, args=args, eval_dataset=ds)
        sampler = trainer._get_eval_sampler(ds)
        return [len(ds[i]["input_ids"]) for i in sampler]

    in_order = [len(ids) for ids in ds["input_ids"]]
    assert lengths_seen(Trainer) != in_order  # what transformers does: the bug this guards against
    assert lengths_seen(module.SequentialEvalTrainer) == in_order


def test_crowded_plot_labels_do_not_overlap():
    """Twelve configurations at one parameter count and nearly one score (the SmolLM2 LoRA cluster):
    every label gets a box of its own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from peftlab.bench.plots import place_labels

    fig = Figure(figsize=(8, 5.5), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = [(4.88e6 * (1 + 0.001 * i), 0.81 + 0.0005 * i, f"lora-variant-{i}") for i in range(12)]
    points += [(2.2e7, 0.80, "full"), (3.0e5, 0.79, "ia3")]
    for x, y, _ in points:
        ax.plot(x, y, "o")
    ax.set_xscale("log")
    ax.set_ylim(0.7, 0.9)
    fig.tight_layout()
    boxes = place_labels(ax, points, canvas.get_renderer())
    assert len(boxes) == len(points)
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlapping


def test_an_outlier_is_drawn_at_the_edge_of_a_zoomed_axis():
    from peftlab.bench.plots import _band

    assert _band([0.40, 0.41, 0.42, 0.40, 0.0]) is not None  # one cell at 0: the axis keeps 0.40-0.42
    low, high = _band([0.40, 0.41, 0.42, 0.40, 0.0])
    assert 0.3 < low < 0.40 and 0.42 < high < 0.5
    assert _band([0.40, 0.41, 0.42, 0.43]) is None  # no outlier: no zoom


def test_committed_results_need_a_clean_tree(bench, tmp_path, monkeypatch):
    """Cells recorded into the repository's own results folder must come from a commit; a scratch
    results folder (--results) or --allow-dirty may run on uncommitted changes."""
    from peftlab.bench import runner
    from peftlab.bench.plan import plan_bench

    monkeypatch.setattr(runner, "git_info", lambda cwd=None: {"commit": "abc", "dirty": True})
    default_results = plan_bench(bench["spec"], quick=True).results_dir
    existed = default_results.exists()
    with pytest.raises(PeftlabError, match=r"uncommitted changes to code that can change a result .* --allow-dirty"):
        run_bench(bench["spec"], quick=True, work_dir=tmp_path / "work", rerun=["*"], out=io.StringIO())
    assert default_results.exists() == existed  # nothing written


def test_report_flags_cells_from_uncommitted_code(bench, tmp_path):
    import json as _json
    import shutil

    rows = [_json.loads(line) for line in (bench["results"] / "results.jsonl").read_text().splitlines() if line]
    for r in rows[:2]:
        r.setdefault("git", {})["dirty"] = True
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    shutil.copy(bench["results"] / "plan.json", out / "plan.json")
    write_report(out / "results.jsonl", out)
    assert "**Not reproducible from a commit:** " in (out / "report.md").read_text()


def test_gpu_report_from_test_results_and_records(tmp_path):
    """benchmarks/gpu_report.py (the last step of gpu_check.sh) on a made-up run: every test's result,
    and CUDA peak / tokens/s ratios to full fine-tuning."""
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite name="pytest"><testcase classname="t" name="test_a"/>'
        '<testcase classname="t" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="t" name="test_c"><skipped message="CUDA not available"/></testcase></testsuite></testsuites>')
    spec = tmp_path / "efficiency_smollm2"
    spec.mkdir()
    recs = [{"cell": f"{c}-s42", "config": c, "status": "ok", "time": {"tokens_per_s": t},
             "memory": {"cuda_max_memory_allocated_bytes": m * 2**20}} for c, t, m in
            (("full", 100.0, 4000), ("nf4-qlora", 150.0, 1000))]
    (spec / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    report = (tmp_path / "report.md").read_text()
    assert "tests/gpu: 1 passed, 1 failed, 1 skipped." in report and "| test_b | failed |" in report
    assert "| nf4-qlora | 1,000 | 150 | 0.25 | 1.50 |" in report


def test_a_cell_with_a_core_budget_passes_it_to_scripts_that_leave_torch_threads_alone(monkeypatch):
    """--cpus-per-cell (PEFTLAB_NUM_THREADS) reaches a baseline script through OpenMP, as it reaches
    peftlab's runs; a spec's own env still has the last word."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from peftlab.bench.runner import _cell_env

    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    monkeypatch.setenv("PEFTLAB_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = _cell_env(SimpleNamespace(env={}))
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "1"
    assert _cell_env(SimpleNamespace(env={"OMP_NUM_THREADS": "2"}))["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("PEFTLAB_NUM_THREADS")
    assert _cell_env(SimpleNamespace(env={}))["OMP_NUM_THREADS"] == "3"  # no budget: the caller's setting stands


def test_heartbeat_shows_the_latest_progress_line_of_either_log(tmp_path):
    """A Trainer script prints its losses to stdout while stderr ends with a warning's source line."""
    import os

    from peftlab.bench.runner import _last_progress

    (tmp_path / "stderr.log").write_text("Map: 50%\rMap: 100% 10/10\n/x/dataloader.py:759: UserWarning: "
                                         "no accelerator\n  super().__init__(loader)\n", encoding="utf-8")
    (tmp_path / "stdout.log").write_text("{'loss': '1.9'}\n{'loss': '1.7', 'epoch': '0.5'}\n", encoding="utf-8")
    os.utime(tmp_path / "stderr.log", (1_000, 1_000))
    os.utime(tmp_path / "stdout.log", (2_000, 2_000))
    assert _last_progress(tmp_path) == "{'loss': '1.7', 'epoch': '0.5'}"
    os.utime(tmp_path / "stderr.log", (3_000, 3_000))  # stderr newer: its last line that is not a warning's source
    assert _last_progress(tmp_path) == "/x/dataloader.py:759: UserWarning: no accelerator"
    (tmp_path / "stderr.log").write_text("step 3/9\rstep 4/9\r", encoding="utf-8")
    os.utime(tmp_path / "stderr.log", (4_000, 4_000))
    assert _last_progress(tmp_path) == "step 4/9"
    assert _last_progress(tmp_path / "missing") == ""


def test_local_cells_keep_to_cpus_per_cell(monkeypatch, capsys):
    """--cpus-per-cell without Ray: each local cell's process gets that many threads (it was ignored,
    so two benches started side by side each ran on every core); the caller's setting comes back after."""
    import os
    from types import SimpleNamespace

    from peftlab.bench import cli as bench_cli, runner
    from peftlab.cli import main

    chosen, seen = [], []
    monkeypatch.setattr(bench_cli, "run_bench", lambda *a, executor=None, **k: chosen.append(executor)
                        or SimpleNamespace(failed=[]))
    monkeypatch.setattr(runner, "run_cell", lambda plan, cell, *a, **k: seen.append(runner._cell_env(cell)) or {})
    monkeypatch.delenv("PEFTLAB_NUM_THREADS", raising=False)
    assert main(["bench", "benchmarks/wnut17_minilm.yaml", "--cpus-per-cell", "1"]) == 0
    assert main(["bench", "benchmarks/wnut17_minilm.yaml"]) == 0
    assert chosen[1] is runner.run_locally  # no budget: every core, as before
    cells = [SimpleNamespace(id=f"c-s{s}", config="c", env={}) for s in (42, 43)]
    assert len(list(chosen[0](SimpleNamespace(cells=cells), cells, [], {}, {}, False, print))) == 2
    assert [(e["PEFTLAB_NUM_THREADS"], e["OMP_NUM_THREADS"]) for e in seen] == [("1", "1")] * 2
    assert "PEFTLAB_NUM_THREADS" not in os.environ
    assert main(["bench", "benchmarks/wnut17_minilm.yaml", "--cpus-per-cell", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cpus-per-cell" in err and "at least 1" in err and len(err.splitlines()) == 1
