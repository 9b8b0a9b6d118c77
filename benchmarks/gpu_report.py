"""The report of benchmarks/gpu_check.sh: ``python benchmarks/gpu_report.py OUT_DIR``.

Reads OUT_DIR/gpu_tests.xml (pytest's JUnit XML of tests/gpu) and the records of the gpu profiles
(OUT_DIR/efficiency_minilm/results.jsonl, OUT_DIR/efficiency_smollm2/results.jsonl) and writes
OUT_DIR/report.md: the device, driver and versions, every test's result, and per configuration the
CUDA peak memory, tokens/s and the ratios to full fine-tuning of the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

SPECS = ("efficiency_minilm", "efficiency_smollm2")


def device_lines() -> list[str]:
    import torch

    from peftlab.bench.provenance import git_info, versions

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = ""
    git = git_info()
    return [f"**Device:** {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'}; "
            f"nvidia-smi: {smi or 'not available'}; CUDA {torch.version.cuda}.",
            "**Versions:** " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".",
            f"**Git commit:** {(git.get('commit') or '?')[:10]}{' (uncommitted changes)' if git.get('dirty') else ''}."]


def test_lines(xml_path: Path) -> list[str]:
    if not xml_path.is_file():
        return [f"No test results ({xml_path.name} missing)."]
    cases = ET.parse(xml_path).getroot().iter("testcase")
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        counts[outcome] += 1
        rows.append(f"| {case.get('name')} | {outcome} |")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return [f"tests/gpu: {summary}.", "", "| test | result |", "|---|---|", *rows]


def bench_lines(results: Path) -> list[str]:
    if not results.is_file():
        return [f"No records ({results} missing)."]
    recs = [json.loads(line) for line in results.read_text().splitlines() if line.strip().startswith("{")]
    ok = {r["config"]: r for r in recs if r.get("status") == "ok"}
    full = ok.get("full")

    def peak(r: dict) -> float:
        return (r.get("memory") or {}).get("cuda_max_memory_allocated_bytes") or float("nan")

    def tps(r: dict) -> float:
        return (r.get("time") or {}).get("tokens_per_s") or float("nan")

    lines = ["| configuration | CUDA peak allocated (MiB) | tokens/s | peak / full | tokens/s / full |",
             "|---|--:|--:|--:|--:|"]
    for name, r in ok.items():
        ratio_p = peak(r) / peak(full) if full else float("nan")
        ratio_t = tps(r) / tps(full) if full else float("nan")
        lines.append(f"| {name} | {peak(r) / 2**20:,.0f} | {tps(r):,.0f} | {ratio_p:.2f} | {ratio_t:.2f} |")
    failed = [r["cell"] for r in recs if r.get("status") != "ok"]
    return lines + (["", f"Failed cells: {', '.join(failed)}."] if failed else [])


def main(out: Path) -> int:
    lines = ["# GPU check", "", f"Written by benchmarks/gpu_check.sh on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
             "(benchmarks/gpu_report.py, not hand-edited).", "", *device_lines(), "", "## tests/gpu", "",
             *test_lines(out / "gpu_tests.xml"), ""]
    for spec in SPECS:
        lines += [f"## {spec}, gpu profile", "", f"Full report: [{spec}/report.md]({spec}/report.md).", "",
                  *bench_lines(out / spec / "results.jsonl"), ""]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu_check")))
