"""Predicted against measured: `peftlab plan` for every configuration of the committed bench reports.

    python benchmarks/planner_accuracy.py                       # every results.jsonl under benchmarks/results
    python benchmarks/planner_accuracy.py --specs efficiency_minilm --measure 30

For each peftlab configuration of a report (baseline scripts are not peftlab runs and are left out),
the planner runs once on the cell's recipe and overrides, and its peak memory and samples/s are set
beside the cell's recorded values (the mean over its seeds). Records made by older code measure that
code: the report names each record's commit. Speed is also compared with the plan each bench cell
recorded minutes before it trained (same machine, same session): this machine's speed drifts between
sessions, so only that pair times the planner and the run under the same conditions. ``--measure N``
instead runs each configuration now for N optimizer steps (with its evaluations) on this commit and
compares with that run. Plans run with the CPU threads the configuration's cells trained with
(`PEFTLAB_NUM_THREADS`; a sweep's trials share the machine's cores).
Writes report.json and report.md (atomically) under ``--out``. Runs one process at a time; nothing
else should run meanwhile (the planner times a few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "planner_accuracy"
DROP = ("train.seed=", "output.dir=", "train.trackers=")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", nargs="*", help="report folders to take (default: every one with results.jsonl)")
    p.add_argument("--measure", type=int, metavar="STEPS", help="run each configuration now for STEPS steps")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def configurations(specs) -> list[dict]:
    """One entry per (spec, configuration) of peftlab cells, with the mean of its recorded values."""
    out: dict = {}
    for path in sorted(RESULTS.glob("*/results.jsonl")):
        spec = path.parent.name
        if specs and spec not in specs:
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("status") != "ok" or r.get("kind") != "peftlab":
                continue
            key = (spec, r["config"])
            entry = out.setdefault(key, {"spec": spec, "config": r["config"], "recipe": r["recipe"],
                                         "overrides": [o for o in r["overrides"] if not o.startswith(DROP)],
                                         "peaks": [], "speeds": [], "commits": set(), "in_run": [], "threads": []})
            entry["peaks"].append(r["memory"]["peak_rss_bytes"])
            entry["speeds"].append(r["time"]["samples_per_s"])
            entry["commits"].add(r["git"]["commit"][:10])
            entry["threads"].append(r["time"].get("threads_per_process") or 0)
            if (r.get("plan") or {}).get("samples_per_s"):  # the bench's own plan, made just before the cell
                entry["in_run"].append((r["plan"]["samples_per_s"], r["time"]["samples_per_s"]))
    return list(out.values())


def cell_threads(entry: dict) -> int:
    """The CPU threads most of the configuration's cells trained with (0: not recorded)."""
    return max(set(entry["threads"]), key=entry["threads"].count)


def run(cmd: list[str], entry: dict) -> subprocess.CompletedProcess:
    """``peftlab CMD`` with the threads the configuration's cells trained with (a sweep or a bench
    running cells side by side gives each fewer than the machine's cores)."""
    threads = cell_threads(entry)
    env = {**os.environ, "PEFTLAB_NUM_THREADS": str(threads)} if threads else None
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *cmd], cwd=ROOT, capture_output=True, text=True, env=env)


def predict(entry: dict) -> dict:
    done = run(["plan", entry["recipe"], *entry["overrides"], "--json"], entry)
    if done.returncode not in (0, 1):
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout)


def measure(entry: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="planner-accuracy-") as tmp:
        done = run(["train", entry["recipe"], *entry["overrides"], f"train.max_steps={steps}",
                    "train.trackers=none", f"output.dir={tmp}/run"], entry)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        res = json.loads((Path(tmp) / "run" / "resources.json").read_text())
    return {"peak": res["peak_rss_bytes"], "speed": res["samples_per_s"]}


def row(entry: dict, plan: dict, measured: dict) -> dict:
    r = {"spec": entry["spec"], "config": entry["config"], "recipe": entry["recipe"], "overrides": entry["overrides"],
         "threads": cell_threads(entry)}
    if "error" in plan or "error" in measured:
        return {**r, "error": plan.get("error") or measured.get("error")}
    r.update(predicted_peak_mib=plan["peak_bytes"] / 2**20, measured_peak_mib=measured["peak"] / 2**20,
             predicted_samples_per_s=plan["samples_per_s"], measured_samples_per_s=measured["speed"],
             peak_phase=plan["peak_phase"], commits=measured.get("commits"))
    r["peak_error"] = r["predicted_peak_mib"] / r["measured_peak_mib"] - 1
    r["speed_error"] = r["predicted_samples_per_s"] / r["measured_samples_per_s"] - 1
    pairs = measured.get("in_run") or []
    if pairs:  # mean over the records that carry a plan, against those same records
        r["in_run_predicted_samples_per_s"] = statistics.mean(p for p, _ in pairs)
        r["in_run_speed_error"] = r["in_run_predicted_samples_per_s"] / statistics.mean(m for _, m in pairs) - 1
        r["in_run_records"] = len(pairs)
    return r


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from peftlab.atomicio import write_json, write_text
    from peftlab.bench.provenance import git_info

    rows = []
    for entry in configurations(args.specs):
        print(f"{entry['spec']} / {entry['config']}", file=sys.stderr, flush=True)
        plan = predict(entry)
        if args.measure:
            measured = measure(entry, args.measure)
        else:
            measured = {"peak": statistics.mean(entry["peaks"]), "speed": statistics.mean(entry["speeds"]),
                        "commits": sorted(entry["commits"]), "in_run": entry["in_run"]}
        rows.append(row(entry, plan, measured))
    report = {"command": "python benchmarks/planner_accuracy.py " + " ".join(argv), "git": git_info(ROOT),
              "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "measured": f"now, {args.measure} steps" if args.measure else "the committed records", "rows": rows}
    out = Path(args.out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    print((out / "report.md").read_text())
    return 0


def markdown(report: dict) -> str:
    rows = [r for r in report["rows"] if "error" not in r]
    within = lambda key, tol: sum(abs(r[key]) <= tol for r in rows if key in r)  # noqa: E731
    in_run = sum("in_run_speed_error" in r for r in rows)
    lines = [
        "# Planner: predicted against measured peak memory and speed", "",
        f"Reproduce: `{report['command'].strip()}`. Generated {report['generated']} by "
        f"benchmarks/planner_accuracy.py, not hand-edited; git {report['git']['commit'][:10]}"
        + (" (uncommitted changes)" if report["git"]["dirty"] else "") + f". Measured: {report['measured']}.", "",
        f"Peak within 15%: {within('peak_error', 0.15)} of {len(rows)}. Samples/s within 25%: "
        f"{within('speed_error', 0.25)} of {len(rows)} predicted now; {within('in_run_speed_error', 0.25)} of "
        f"the {in_run} whose records carry the plan their bench made just before the cell (same machine and "
        "session: this machine's speed drifts between sessions, so that pair is the like-for-like one).", "",
        "| report | configuration | threads | predicted peak MiB | measured MiB | error | peak phase | predicted samples/s "
        "| measured | error | predicted in the run | error | records' commits |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['config']} | {r['threads'] or '?'} | failed: {r['error']} | | | | | | | | | |")
            continue
        run = (f"{r['in_run_predicted_samples_per_s']:.1f} | {r['in_run_speed_error']:+.0%}"
               if "in_run_speed_error" in r else "- | -")
        lines.append(
            f"| {r['spec']} | {r['config']} | {r['threads'] or '?'} | {r['predicted_peak_mib']:,.0f} | {r['measured_peak_mib']:,.0f} | "
            f"{r['peak_error']:+.0%} | {r['peak_phase']} | {r['predicted_samples_per_s']:.1f} | "
            f"{r['measured_samples_per_s']:.1f} | {r['speed_error']:+.0%} | {run} | "
            f"{', '.join(r['commits'] or ['this one'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
