"""``peftlab report RESULTS.jsonl``: the benchmark report, computed from the records alone.

Writes next to the JSONL (or into ``--out``):

* ``report.md``  – header (how to reproduce it, machine, versions, which cells are missing or failed),
  one table row per configuration (mean ± sample std over seeds), peftlab vs baseline, plots;
* ``report.csv`` – the same table, full precision, ``<value>_mean`` / ``<value>_std`` / ``<value>_n``;
* ``test_<metric>_vs_trainable_params.png`` and ``test_<metric>_vs_peak_memory.png``.

If ``plan.json`` (written by ``peftlab bench``) lies next to the JSONL, only the cells of that plan
are reported and the planned cells without an ``ok`` record are listed. Nothing in the report is
typed by hand: every number is computed here from the records; the output has no timestamps, so
the same JSONL always gives the same files.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..atomicio import write_bytes, write_text
from ..errors import PeftlabError
from .plots import plot_points
from .records import load_records
from .search import search_lines
from .search import search_plots as make_search_plots
from .summary import RATIO_KEYS, Row, Summary, record_value, comparisons, format_stat, machine_summary, reference_ratios, summarize

# ----------------------------------------------------------------------------------- statistics


# ------------------------------------------------------------------------------------- summary


# -------------------------------------------------------------------------------------- output


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short_backbone(name: Optional[str]) -> str:
    return Path(str(name)).name if name else "–"


def _method_text(row: Row) -> str:
    method = row.first("method") or "?"
    if row.first("kind") == "baseline":
        method += " (Trainer)"
    return method


def peft_count_lines(s: Summary) -> list[str]:
    """One line comparing peftlab's trainable-parameter count with peft's own, per configuration."""
    same, differ, no_peft, baselines = [], [], [], []
    for row in s.rows:
        pairs = [(record_value(r, "params", "trainable_params"), record_value(r, "params", "peft_trainable_params")) for r in row.records]
        if not pairs:
            continue
        if row.first("kind") == "baseline":
            baselines.append(row.config)
        elif all(p is None for _, p in pairs):
            no_peft.append(row.config)
        elif all(a == p for a, p in pairs):
            same.append(row.config)
        else:
            a, p = next((a, p) for a, p in pairs if a != p)
            differ.append(f"{row.config} (peftlab {a:,} vs peft {p if p is None else format(p, ',')})")
    if not same and not differ:
        return []
    text = ("Trainable parameters against peft's own count (`get_nb_trainable_parameters()` of the peft "
            f"model, task head included): equal for {', '.join(same) or 'none'}")
    if differ:
        text += f"; **different** for {', '.join(differ)}"
    if no_peft:
        text += f"; no peft model (counted by peftlab alone) for {', '.join(no_peft)}"
    if baselines:
        text += f"; counted by the baseline script itself (`requires_grad` parameters) for {', '.join(baselines)}"
    return [text + ".", ""]


def _ratio_lines(s: Summary) -> list[str]:
    ratios = reference_ratios(s)
    keys = [(k, h) for k, h in RATIO_KEYS if any(r[k] is not None for r in ratios)]
    if not ratios or not keys:
        return []
    lines = [f"## Ratios to `{s.reference}`", "",
             f"Each configuration's mean divided by `{s.reference}`'s, all from this spec's cells (throughput > 1: "
             "faster; memory < 1: lighter).", "",
             "| configuration | " + " | ".join(h for _, h in keys) + " |", "|---|" + "--:|" * len(keys)]
    for r in ratios:
        lines.append(f"| {_md_escape(r['config'])} | " + " | ".join(
            "–" if r[k] is None else f"{r[k]:.2f}" for k, _ in keys) + " |")
    return lines + [""]


def render_markdown(summary: Summary, records_path: Path, plots: dict[str, str],
                    search_plots: Optional[dict[str, str]] = None) -> str:
    s = summary
    lines = _header_lines(s, records_path) + _table_lines(s) + _ratio_lines(s) + _comparison_lines(s)
    lines += search_lines(s, search_plots or {})
    lines += _tail_lines(s, records_path, plots)
    return "\n".join(lines).rstrip() + "\n"


def _header_lines(s: Summary, records_path: Path) -> list[str]:
    """Title, how to reproduce, machine, versions, commit, load, which cells are in."""
    lines = [f"# Benchmark report: {s.title}" + (f" ({s.profile} profile)" if s.profile else ""), ""]
    if s.description:
        lines += [s.description.strip(), ""]
    lines += bottom_line(s)
    if s.command:
        lines += [f"**Reproduce** (from the repository root): `{s.command}`. It skips the cells already in "
                  f"`{records_path.name}` and rewrites this report; `peftlab report {records_path}` rewrites "
                  f"only the report.", ""]
    lines += _machine_lines(s)
    vers: dict[str, set] = {}
    commits: set = set()
    for r in s.ok:
        for k, v in (r.get("versions") or {}).items():
            vers.setdefault(k, set()).add(str(v))
        g = r.get("git") or {}
        if g.get("commit"):
            commits.add(g["commit"][:10] + (" (uncommitted changes)" if g.get("dirty") else ""))
    if vers:
        lines.append("**Versions:** " + ", ".join(f"{k} {' / '.join(sorted(v))}" for k, v in vers.items()) + ".")
    if commits:
        lines.append("**Git commit:** " + ", ".join(sorted(commits)) + ".")
    dirty = [r["cell"] for r in s.ok if (r.get("git") or {}).get("dirty")]
    if dirty:
        lines.append(f"**Not reproducible from a commit:** {len(dirty)} cell(s) ran with uncommitted code changes "
                     f"({', '.join(dirty[:6])}{', ...' if len(dirty) > 6 else ''}); re-run them on a clean commit.")
    loads = [r["load_avg"] for r in s.ok if isinstance(r.get("load_avg"), dict)]
    if loads:
        cores = sorted({record_value(r, "machine", "cores") for r in s.ok if record_value(r, "machine", "cores")})
        lines.append(f"**Machine load while the cells ran:** 1-minute load average {min(x['mean'] for x in loads):.1f}"
                     f"–{max(x['mean'] for x in loads):.1f} (cell means; highest sample {max(x['max'] for x in loads):.1f})"
                     f" on {'/'.join(map(str, cores))} cores. Times and throughput are only comparable between cells "
                     f"that ran at a similar load.")
    planned = s.planned if s.planned is not None else len(s.ok) + len(s.failed)
    failed = len(s.failed) - len(s.stopped)  # a trial a sweep stopped early is finished, not failed
    complete = not s.missing and not failed and not s.changed
    state = "complete" if complete else "**PARTIAL**"
    stopped = f", {len(s.stopped)} stopped early" if s.stopped else ""
    older = f", {len(s.changed)} recorded with an older recipe (not in the tables)" if s.changed else ""
    lines.append(f"**Cells:** {planned} planned, {len(s.ok)} ok{stopped}, {failed} failed, {len(s.missing)} missing"
                 f"{older} ({state}).")
    lines += ["", f"Every number is computed from `{records_path.name}` (one JSON record per cell). Values are the "
              "mean ± sample standard deviation (n−1) over the seeds that finished; `seeds` = finished/planned. "
              "Each cell ran in its own process: peak RSS is that process's maximum resident memory "
              "(Linux `VmHWM`), model-load RSS is the resident memory right after the model was built; train time "
              "excludes evaluation; throughput counts training samples and non-padding tokens; saved size is the "
              "run's `model/` folder.", ""]
    return lines


def bottom_line(s: Summary) -> list[str]:
    """Two or three sentences computed from the records: the best configuration by the test metric,
    the lightest and the fastest, and peftlab against the Trainer script where the spec has it."""
    def best(key: str, pick: Any) -> Optional[tuple[str, Any]]:
        rows = [(r.config, r.stats[key]) for r in s.rows if r.stats.get(key) and r.stats[key].mean is not None]
        return pick(rows, key=lambda cs: cs[1].mean) if rows else None

    def pm(st: Any, fmt: str) -> str:
        return fmt.format(st.mean) + (f" ± {fmt.format(st.std)}" if st.std is not None else "") + \
            f" ({st.n} seed{'s' if st.n != 1 else ''})"

    parts = []
    top = best(f"test_{s.metric}", min if s.metric_mode == "min" else max) if s.metric else None
    if top:
        parts.append(f"best test {s.metric}: `{top[0]}`, {pm(top[1], '{:.4f}')}.")
    light, fast = best("peak_rss_mib", min), best("samples_per_s", max)
    if light and fast:
        parts.append(f"Lightest: `{light[0]}` ({light[1].mean:,.0f} MiB peak RSS); fastest: `{fast[0]}` "
                     f"({fast[1].mean:.1f} samples/s).")
    for c in comparisons(s):
        ratio, diff = c["samples_per_s_ratio"], c.get(f"test_{s.metric}_diff")
        if ratio is None or diff is None:
            continue
        peak = c["peak_rss_ratio"]
        cost = f" at {ratio:.2f}x its samples/s and {peak:.2f}x its peak RSS" if peak is not None else ""
        parts.append(f"`{c['peftlab']}` vs the Trainer script: {diff:+.4f} test {s.metric}{cost}.")
    return ["**Bottom line:** " + " ".join(parts), ""] if parts else []


def _machine_lines(s: Summary) -> list[str]:
    machines: dict[str, int] = {}
    for r in s.ok + s.failed:
        if r.get("machine"):
            key = machine_summary(r["machine"])
            machines[key] = machines.get(key, 0) + 1
    if len(machines) == 1:
        return [f"**Machine:** {next(iter(machines))}."]
    if machines:
        return ["**Machines:** " + "; ".join(f"{m} ({n} cells)" for m, n in sorted(machines.items())) + "."]
    return []


def _table_lines(s: Summary) -> list[str]:
    """The main table: one row per configuration."""
    lines = []
    md_cols = [c for c in s.columns if c.markdown]
    head = ["configuration", "method", "quant.", "seeds"] + [c.header for c in md_cols]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["--:"] * (len(head) - 3)) + "|")
    for row in s.rows:
        cells = [_md_escape(row.config), _md_escape(_method_text(row)), _md_escape(row.first("quantization") or "none"),
                 f"{len(row.records)}/{row.planned}"]
        cells += [format_stat(row.stats[c.key], c.fmt) for c in md_cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += peft_count_lines(s)
    backbones = sorted({_short_backbone(r.get("backbone")) for r in s.ok})
    if backbones:
        lines += [f"Backbone: {', '.join(backbones)}. Method options are in `report.csv` and in the records.", ""]

    return lines


def _comparison_lines(s: Summary) -> list[str]:
    """peftlab vs the Trainer baseline of the same recipe."""
    lines: list[str] = []
    comps = comparisons(s)
    if comps:
        m = s.metric
        scripts = sorted({r["script"] for r in s.ok + s.missing if r.get("script")}) or [
            "benchmarks/baselines/trainer_baseline.py"]
        lines += ["## peftlab vs a plain transformers Trainer script", "",
                  f"The baseline is {' / '.join(f'`{x}`' for x in scripts)}: transformers `Trainer` (+ peft for "
                  "LoRA) on the same recipe (backbone, data, hyperparameters, seeds), written the way the "
                  "transformers docs teach it. Ratios are peftlab / Trainer (throughput > 1: peftlab is faster); "
                  "the difference is peftlab − Trainer.", "",
                  f"| peftlab | Trainer baseline | samples/s ratio | tokens/s ratio | peak RSS ratio | test {m} "
                  f"peftlab | test {m} Trainer | difference |",
                  "|---|---|--:|--:|--:|--:|--:|--:|"]

        def f(v: Optional[float], fmt: str) -> str:
            return "–" if v is None else fmt.format(v)

        for c in comps:
            lines.append(f"| {c['peftlab']} | {c['baseline']} | {f(c['samples_per_s_ratio'], '{:.2f}')} | "
                         f"{f(c['tokens_per_s_ratio'], '{:.2f}')} | {f(c['peak_rss_ratio'], '{:.2f}')} | "
                         f"{f(c[f'test_{m}_peftlab'], '{:.4f}')} | {f(c[f'test_{m}_baseline'], '{:.4f}')} | "
                         f"{f(c[f'test_{m}_diff'], '{:+.4f}')} |")
        lines.append("")
        ran = {r.config for r in s.rows if r.records}  # a side with no cells yet has nothing to compare
        for c in comps:
            if c["machine_count"] > 1 and {c["peftlab"], c["baseline"]} <= ran:
                lines += [f"{c['peftlab']} vs {c['baseline']}: their cells ran on different machines "
                          f"({c['machines']}), so no throughput or memory ratio is given.", ""]

    return lines


def _tail_lines(s: Summary, records_path: Path, plots: dict[str, str]) -> list[str]:
    """Cross-checks, plots, and the cells that are not in the tables."""
    lines: list[str] = []
    cross = [(record_value(r, "memory", "peak_rss_bytes"), record_value(r, "memory", "parent_peak_rss_bytes")) for r in s.ok]
    cross = [(a, b) for a, b in cross if a and b]
    if cross:
        worst = max(abs(a - b) / b for a, b in cross)
        lines += [f"Peak RSS cross-check: the bench measured each cell's process from outside (`wait4`); it "
                  f"differs from what the run reported by at most {100 * worst:.1f}% over {len(cross)} cells.", ""]

    if plots:
        lines += ["## Plots", ""]
        for caption, name in plots.items():
            lines += [f"![{caption}]({name})", ""]

    resumed = [r for r in s.ok if r.get("resumed") or r.get("harvested")]
    if resumed:
        lines += ["Cells resumed from a checkpoint or recorded from a finished run folder after the bench was "
                  "interrupted (their peak RSS covers only the resumed process; the outside `wait4` measure is "
                  "missing for recorded ones): " + ", ".join(f"`{r['cell']}`" for r in resumed) + ".", ""]
    if s.stopped:
        lines += ["## Stopped early", "", "Sweep trials that early stopping ended (their best dev metric is in "
                  "the search table):", "", "| cell | why |", "|---|---|"]
        lines += [f"| {_md_escape(r['cell'])} | {_md_escape(r.get('error') or '?')} |" for r in s.stopped] + [""]
    failed = [r for r in s.failed if r.get("status") != "stopped"]
    if failed:
        lines += ["## Failed cells", "", "| cell | error |", "|---|---|"]
        for r in failed:
            lines.append(f"| {_md_escape(r['cell'])} | {_md_escape(r.get('error') or '?')} |")
        lines.append("")
    if s.missing:
        lines += ["## Missing cells (not run yet)", "",
                  ", ".join(f"`{c['cell']}`" for c in s.missing), ""]
    if s.changed:
        lines += ["## Cells recorded with an older recipe", "",
                  "Their recipe, overrides or script differ from what the spec gives now, so the tables and plots "
                  "leave them out; re-run the bench to replace them: "
                  + ", ".join(f"`{r['cell']}`" for r in s.changed), ""]
    if s.ignored:
        lines += [f"{len(s.ignored)} record(s) in `{records_path.name}` belong to cells no longer in the spec and "
                  f"are not reported.", ""]
    return lines


def render_csv(summary: Summary) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["config", "kind", "method", "method_options", "quantization", "backbone", "task", "metric",
            "compare_to", "seeds_ok", "seeds_planned", "seeds"]
    for c in summary.columns:
        head += [f"{c.key}_mean", f"{c.key}_std", f"{c.key}_n"]
    w.writerow(head)
    for row in summary.rows:
        opts = row.first("method_options")
        out = [row.config, row.first("kind") or "", row.first("method") or "",
               json.dumps(opts, sort_keys=True) if opts is not None else "", row.first("quantization") or "",
               row.first("backbone") or "", row.first("task") or "", row.first("metric") or "",
               row.first("compare_to") or "", len(row.records), row.planned,
               " ".join(str(r.get("seed")) for r in row.records)]
        for c in summary.columns:
            st = row.stats[c.key]
            out += ["" if st.mean is None else repr(st.mean), "" if st.std is None else repr(st.std), st.n]
        w.writerow(out)
    return buf.getvalue()


def render_comparison_csv(summary: Summary) -> Optional[str]:
    comps = comparisons(summary)
    if not comps:
        return None
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(comps[0]), lineterminator="\n")
    w.writeheader()
    for c in comps:
        w.writerow({k: ("" if v is None else (repr(v) if isinstance(v, float) else v)) for k, v in c.items()})
    return buf.getvalue()


def write_report(results: Union[str, os.PathLike], out_dir: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Write report.md, report.csv (+ baseline_comparison.csv) and the plots; returns their paths."""
    results = Path(results)
    records = load_records(results)
    if not records:
        raise PeftlabError(f"{results}: no complete records")
    out = Path(out_dir) if out_dir else results.parent
    plan = None
    plan_path = results.parent / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    summary = summarize(records, plan)
    paths: dict[str, Optional[Path]] = {}
    plots: dict[str, str] = {}
    m = summary.metric
    if m:
        gpu = "gpu_max_allocated_mib" in {c.key for c in summary.columns}
        mem_key = "gpu_max_allocated_mib" if gpu else "peak_rss_mib"
        mem_label = "GPU max allocated (MiB)" if gpu else "peak RSS of the run's process (MiB)"
        for name, key, label, log_x, caption in (
            (f"test_{m}_vs_trainable_params.png", "trainable_params", "trainable parameters (log scale)", True,
             f"test {m} vs trainable parameters"),
            (f"test_{m}_vs_peak_memory.png", mem_key, mem_label, False, f"test {m} vs peak memory"),
        ):
            png = plot_points(summary, key, label, log_x, f"{summary.title}: {caption}")
            if png is not None:
                paths[name] = write_bytes(out / name, png)
                plots[caption] = name
    searched = {}
    for name, png in make_search_plots(summary).items():
        paths[name] = write_bytes(out / name, png)
        searched[f"dev {m} vs {name[len('search_'):-len('.png')]}"] = name
    paths["csv"] = write_text(out / "report.csv", render_csv(summary))
    comp = render_comparison_csv(summary)
    if comp is not None:
        paths["comparison_csv"] = write_text(out / "baseline_comparison.csv", comp)
    paths["markdown"] = write_text(out / "report.md", render_markdown(summary, results, plots, searched))
    return {k: str(v) for k, v in paths.items()}
