"""`train.batch_size: auto` under a memory budget between two measured runs' peaks.

    python benchmarks/auto_batch.py                  # recipes/lora_ner.yaml, one epoch per run
    python benchmarks/auto_batch.py --recipe recipes/full_ner.yaml --steps 60

Trains the recipe twice with fixed settings that make the same optimizer steps: batch B, and
batch B/2 with 2 accumulation steps (B = the recipe's batch size). Each run's peak RSS is read from
its resources.json. The budget is halfway between the two peaks. A third run takes
``train.batch_size: auto`` with ``train.target_batch_size: B`` and that budget. The report shows
the two peaks, the budget, what the third run chose (its plan.json) and its measured peak.
Writes report.json and report.md (atomically) under ``--out``. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "auto_batch"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/lora_ner.yaml")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: one epoch)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def train(recipe: str, overrides: list[str], folder: Path) -> dict:
    """One run; its resources.json and, for an auto run, its plan.json."""
    cmd = [sys.executable, "-m", "peftlab.cli", "train", recipe, *overrides, "train.trackers=none",
           f"output.dir={folder}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"auto_batch: {' '.join(cmd[3:])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    plan = folder / "plan.json"
    return {"resources": json.loads((folder / "resources.json").read_text()),
            "plan": json.loads(plan.read_text()) if plan.exists() else None}


def measure(recipe: str, steps: int | None, tmp: Path) -> dict:
    from peftlab.recipe import load_recipe

    batch = load_recipe(ROOT / recipe).train.batch_size
    common = [f"train.max_steps={steps}"] if steps else ["train.epochs=1"]
    settings = {"large": [f"train.batch_size={batch}", "train.grad_accum=1"],
                "small": [f"train.batch_size={batch // 2}", "train.grad_accum=2"]}
    runs = {name: train(recipe, common + extra, tmp / name) for name, extra in settings.items()}
    peaks = {name: run["resources"]["peak_rss_bytes"] for name, run in runs.items()}
    budget = (peaks["large"] + peaks["small"]) // 2
    auto = train(recipe, common + ["train.batch_size=auto", f"train.target_batch_size={batch}",
                                   f"train.memory_budget={budget}"], tmp / "auto")
    return {"recipe": recipe, "steps": steps, "target_batch_size": batch, "settings": settings, "peaks": peaks,
            "budget": budget, "auto_peak": auto["resources"]["peak_rss_bytes"], "auto_plan": auto["plan"],
            "under_budget": auto["resources"]["peak_rss_bytes"] <= budget}


def markdown(report: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    plan = report["auto_plan"] or {}
    chosen = plan.get("settings") or {}
    lines = [
        "# `train.batch_size: auto` under a budget between two measured peaks", "",
        f"Reproduce: `{report['command'].strip()}`. Generated {report['generated']} by benchmarks/auto_batch.py, "
        f"not hand-edited; git {report['git']['commit'][:10]}" + (" (uncommitted changes)" if report["git"]["dirty"] else "")
        + f". Recipe `{report['recipe']}`, " + (f"{report['steps']} optimizer steps" if report["steps"] else "one epoch")
        + " per run.", "",
        "| run | settings | peak RSS |", "|---|---|--:|",
    ]
    for name in ("large", "small"):
        lines.append(f"| {name} | {' '.join(report['settings'][name])} | {mib(report['peaks'][name])} |")
    lines.append(f"| auto | budget {mib(report['budget'])} (halfway) | {mib(report['auto_peak'])} |")
    lines += ["", f"The auto run chose: {', '.join(f'{k} {v}' for k, v in chosen.items()) or '?'}; "
              f"predicted peak {mib(plan['peak_bytes']) if plan.get('peak_bytes') else '?'}.", "",
              f"Measured peak under the budget: **{'yes' if report['under_budget'] else 'no'}** "
              f"({report['auto_peak'] / report['budget']:.2f}x the budget).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from peftlab.atomicio import write_json, write_text
    from peftlab.bench.provenance import git_info

    with tempfile.TemporaryDirectory(prefix="auto-batch-") as tmp:
        result = measure(args.recipe, args.steps, Path(tmp))
    report = {"command": "python benchmarks/auto_batch.py " + " ".join(argv), "git": git_info(ROOT),
              "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **result}
    out = Path(args.out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    print((out / "report.md").read_text())
    return 0 if report["under_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
