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
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..atomicio import write_bytes, write_text
from ..errors import PeftlabError
from .plots import plot_points
from .records import load_records

MIB = 2**20
HIDDEN_TEST_METRICS = ("loss", "examples", "completion_tokens")  # counts, not scores


# ----------------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    mean: Optional[float]
    std: Optional[float]  # sample standard deviation (n - 1); None for n < 2
    n: int

    @classmethod
    def of(cls, values: list[Optional[float]]) -> "Stat":
        vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(float(v))]
        if not vals:
            return cls(None, None, 0)
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) >= 2 else None, len(vals))


def _get(rec: dict, *path: str) -> Any:
    node: Any = rec
    for p in path:
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    return node


def _mib(v: Any) -> Optional[float]:
    return v / MIB if isinstance(v, (int, float)) else None


@dataclass
class Column:
    key: str  # CSV name
    header: str  # Markdown header
    get: Callable[[dict], Any]
    fmt: str  # format of mean and std in the Markdown table
    markdown: bool = True


def columns_for(records: list[dict], metric: Optional[str]) -> list[Column]:
    test_names: list[str] = []
    for r in records:
        for k in (r.get("test") or {}):
            if k not in test_names and k not in HIDDEN_TEST_METRICS:
                test_names.append(k)
    test_names.sort(key=lambda k: (k != metric, k))
    cols: list[Column] = []
    if metric:
        cols.append(Column(f"dev_{metric}", f"dev {metric}", lambda r, m=metric: _get(r, "dev", m), "{:.4f}"))
    for m in test_names:
        cols.append(Column(f"test_{m}", f"test {m}", lambda r, m=m: _get(r, "test", m), "{:.4f}"))
    cols += [
        Column("trainable_params", "trainable params", lambda r: _get(r, "params", "trainable_params"), "{:,.0f}"),
        Column("trainable_pct", "trainable %", lambda r: _get(r, "params", "trainable_pct"), "{:.3f}"),
        Column("trainable_head_params", "of which head", lambda r: _get(r, "params", "trainable_head_params"), "{:,.0f}"),
        Column("trainable_pct_without_head", "trainable % w/o head",
               lambda r: _get(r, "params", "trainable_pct_without_head"), "{:.3f}", markdown=False),
        Column("peft_trainable_params", "trainable params counted by peft",
               lambda r: _get(r, "params", "peft_trainable_params"), "{:,.0f}", markdown=False),
        Column("total_params", "total params", lambda r: _get(r, "params", "total_params"), "{:,.0f}", markdown=False),
        Column("peak_rss_mib", "peak RSS (MiB)", lambda r: _mib(_get(r, "memory", "peak_rss_bytes")), "{:.0f}"),
        Column("parent_peak_rss_mib", "peak RSS seen by the bench (MiB)",
               lambda r: _mib(_get(r, "memory", "parent_peak_rss_bytes")), "{:.0f}", markdown=False),
        Column("load_rss_mib", "model-load RSS (MiB)", lambda r: _mib(_get(r, "memory", "load_rss_bytes")), "{:.0f}"),
    ]
    if any(_get(r, "memory", "cuda_max_memory_allocated_bytes") is not None for r in records):
        cols += [
            Column("gpu_max_allocated_mib", "GPU max allocated (MiB)",
                   lambda r: _mib(_get(r, "memory", "cuda_max_memory_allocated_bytes")), "{:.0f}"),
            Column("gpu_max_reserved_mib", "GPU max reserved (MiB)",
                   lambda r: _mib(_get(r, "memory", "cuda_max_memory_reserved_bytes")), "{:.0f}"),
        ]
    cols += [
        Column("train_time_s", "train time (s)", lambda r: _get(r, "time", "train_time_s"), "{:.1f}"),
        Column("samples_per_s", "samples/s", lambda r: _get(r, "time", "samples_per_s"), "{:.1f}"),
        Column("tokens_per_s", "tokens/s", lambda r: _get(r, "time", "tokens_per_s"), "{:.0f}"),
        Column("cell_wall_s", "cell wall time (s)", lambda r: r.get("cell_wall_s"), "{:.1f}", markdown=False),
        Column("size_mib", "saved size (MiB)", lambda r: _mib(_get(r, "size", "model_dir_bytes")), "{:.2f}"),
        Column("best_epoch", "best epoch", lambda r: r.get("best_epoch"), "{:.1f}"),
    ]
    return cols


def format_stat(s: Stat, fmt: str) -> str:
    if s.mean is None:
        return "–"
    text = fmt.format(s.mean)
    if s.std is not None:
        text += " ± " + fmt.format(s.std)
    return text


# ------------------------------------------------------------------------------------- summary


@dataclass
class Row:
    config: str
    records: list[dict]
    planned: int
    stats: dict[str, Stat] = field(default_factory=dict)
    others: list[dict] = field(default_factory=list)  # failed records and plan entries (identity only)

    def first(self, key: str) -> Any:
        for r in self.records + self.others:
            if r.get(key) is not None:
                return r.get(key)
        return None


@dataclass
class Summary:
    title: str
    profile: Optional[str]
    description: Optional[str]
    command: Optional[str]
    metric: Optional[str]
    rows: list[Row]
    columns: list[Column]
    ok: list[dict]
    failed: list[dict]
    missing: list[dict]
    changed: list[dict]
    ignored: list[dict]
    planned: Optional[int]
    reference: Optional[str] = None


def summarize(records: list[dict], plan: Optional[dict] = None) -> Summary:
    ignored, changed, missing = [], [], []
    if plan is not None:
        planned = {c["cell"]: c for c in plan.get("cells", [])}
        ignored = [r for r in records if r["cell"] not in planned]
        records = [r for r in records if r["cell"] in planned]
        missing = [c for c in plan["cells"] if c["cell"] not in {r["cell"] for r in records}]
        # a record made with an older recipe/script is listed, never averaged with the current ones
        changed = [r for r in records if r.get("recipe_hash") != planned[r["cell"]].get("recipe_hash")]
        records = [r for r in records if r.get("recipe_hash") == planned[r["cell"]].get("recipe_hash")]
        order: dict[str, int] = {}
        for i, c in enumerate(plan["cells"]):
            order.setdefault(c["config"], i)
        n_planned = {cfg: sum(1 for c in plan["cells"] if c["config"] == cfg) for cfg in order}
    else:
        order, n_planned = {}, {}
        for r in records:
            order.setdefault(r["config"], len(order))
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    metrics = [r.get("metric") for r in ok if r.get("metric")]
    metric = max(set(metrics), key=lambda m: (metrics.count(m), m)) if metrics else None
    cols = columns_for(ok, metric)
    configs = sorted({r["config"] for r in records} | set(n_planned), key=lambda c: (order.get(c, 10**9), c))
    rows = []
    for cfg in configs:
        recs = sorted([r for r in ok if r["config"] == cfg], key=lambda r: r.get("seed", 0))
        row = Row(cfg, recs, n_planned.get(cfg, len([r for r in records if r["config"] == cfg])))
        row.others = [r for r in failed if r["config"] == cfg]
        row.others += [c for c in (plan or {}).get("cells", []) if c["config"] == cfg]
        for c in cols:
            row.stats[c.key] = Stat.of([c.get(r) for r in recs])
        rows.append(row)
    title = (plan or {}).get("spec") or (records[0].get("spec") if records else "benchmark")
    profile = (plan or {}).get("profile") or (records[0].get("profile") if records else None)
    command = (plan or {}).get("command") or (records[0].get("bench_command") if records else None)
    return Summary(title, profile, (plan or {}).get("description"), command, metric, rows, cols, ok, failed,
                   missing, changed, ignored, len(plan["cells"]) if plan else None, (plan or {}).get("reference"))


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


def machine_summary(m: dict) -> str:
    """One line naming a record's machine (CPU, cores, RAM, GPUs): records with equal lines ran on one machine."""
    text = f"{m.get('cpu')} ({m.get('cores')} cores"
    if m.get("memory_gib"):
        text += f", {m['memory_gib']} GiB RAM"
    text += ")"
    gpus = m.get("gpus") or []
    if gpus:
        text += "; GPU: " + ", ".join(f"{g['name']} ({g.get('memory_gib')} GiB)" for g in gpus)
    else:
        text += "; no GPU"
    return text


def _machines(*rows: Row) -> set[str]:
    return {machine_summary(r["machine"]) for row in rows for r in row.records if r.get("machine")}


def _mean_ratio(a: Row, b: Row, key: str) -> Optional[float]:
    """a's mean of ``key`` over b's; None when either is missing or their cells ran on several machines."""
    sa, sb = a.stats.get(key), b.stats.get(key)
    if sa is None or sb is None or sa.mean is None or not sb.mean or len(_machines(a, b)) > 1:
        return None
    return sa.mean / sb.mean


def comparisons(summary: Summary) -> list[dict]:
    by_name = {r.config: r for r in summary.rows}
    out = []
    m = summary.metric
    for row in summary.rows:
        target = row.first("compare_to")
        if not target or target not in by_name:
            continue
        ours = by_name[target]
        # throughput and memory compare only on one machine; the metric difference holds anywhere
        machines = sorted(_machines(ours, row))

        def ratio(key: str) -> Optional[float]:
            return _mean_ratio(ours, row, key)

        if not ours.records and not row.records:
            continue
        a, b = ours.stats.get(f"test_{m}"), row.stats.get(f"test_{m}")
        diff = a.mean - b.mean if a and b and a.mean is not None and b.mean is not None else None
        out.append({
            "baseline": row.config, "peftlab": ours.config,
            "samples_per_s_ratio": ratio("samples_per_s"), "tokens_per_s_ratio": ratio("tokens_per_s"),
            "peak_rss_ratio": ratio("peak_rss_mib"), "train_time_ratio": ratio("train_time_s"),
            f"test_{m}_peftlab": a.mean if a else None, f"test_{m}_baseline": b.mean if b else None,
            f"test_{m}_diff": diff, "machine_count": len(machines), "machines": " and ".join(machines),
        })
    return out


def peft_count_lines(s: Summary) -> list[str]:
    """One line comparing peftlab's trainable-parameter count with peft's own, per configuration."""
    same, differ, no_peft, baselines = [], [], [], []
    for row in s.rows:
        pairs = [(_get(r, "params", "trainable_params"), _get(r, "params", "peft_trainable_params")) for r in row.records]
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


RATIO_KEYS = (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("peak_rss_mib", "peak RSS"),
              ("load_rss_mib", "model-load RSS"), ("gpu_max_allocated_mib", "GPU max allocated"))


def reference_ratios(summary: Summary) -> list[dict]:
    """Each configuration's throughput and memory divided by the spec's reference configuration's
    (means over seeds); none where the cells ran on more than one machine."""
    by_name = {r.config: r for r in summary.rows}
    ref = by_name.get(summary.reference or "")
    if ref is None or not ref.records:
        return []
    out = []
    for row in summary.rows:
        if not row.records:
            continue
        out.append({"config": row.config, **{key: _mean_ratio(row, ref, key) for key, _ in RATIO_KEYS}})
    return out


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


def render_markdown(summary: Summary, records_path: Path, plots: dict[str, str]) -> str:
    s = summary
    lines = [f"# Benchmark report: {s.title}" + (f" ({s.profile} profile)" if s.profile else ""), ""]
    if s.description:
        lines += [s.description.strip(), ""]
    if s.command:
        lines += [f"**Reproduce** (from the repository root): `{s.command}`. It skips the cells already in "
                  f"`{records_path.name}` and rewrites this report; `peftlab report {records_path}` rewrites "
                  f"only the report.", ""]
    machines: dict[str, int] = {}
    for r in s.ok + s.failed:
        if r.get("machine"):
            key = machine_summary(r["machine"])
            machines[key] = machines.get(key, 0) + 1
    if len(machines) == 1:
        lines.append(f"**Machine:** {next(iter(machines))}.")
    elif machines:
        lines.append("**Machines:** " + "; ".join(f"{m} ({n} cells)" for m, n in sorted(machines.items())) + ".")
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
    loads = [r["load_avg"] for r in s.ok if isinstance(r.get("load_avg"), dict)]
    if loads:
        cores = sorted({_get(r, "machine", "cores") for r in s.ok if _get(r, "machine", "cores")})
        lines.append(f"**Machine load while the cells ran:** 1-minute load average {min(x['mean'] for x in loads):.1f}"
                     f"–{max(x['mean'] for x in loads):.1f} (cell means; highest sample {max(x['max'] for x in loads):.1f})"
                     f" on {'/'.join(map(str, cores))} cores. Times and throughput are only comparable between cells "
                     f"that ran at a similar load.")
    planned = s.planned if s.planned is not None else len(s.ok) + len(s.failed)
    complete = not s.missing and not s.failed and not s.changed
    state = "complete" if complete else "**PARTIAL**"
    older = f", {len(s.changed)} recorded with an older recipe (not in the tables)" if s.changed else ""
    lines.append(f"**Cells:** {planned} planned, {len(s.ok)} ok, {len(s.failed)} failed, {len(s.missing)} missing"
                 f"{older} ({state}).")
    lines += ["", f"Every number is computed from `{records_path.name}` (one JSON record per cell). Values are the "
              "mean ± sample standard deviation (n−1) over the seeds that finished; `seeds` = finished/planned. "
              "Each cell ran in its own process: peak RSS is that process's maximum resident memory "
              "(`getrusage`), model-load RSS is the resident memory right after the model was built; train time "
              "excludes evaluation; throughput counts training samples and non-padding tokens; saved size is the "
              "run's `model/` folder.", ""]

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

    lines += _ratio_lines(s)
    comps = comparisons(s)
    if comps:
        m = s.metric
        lines += ["## peftlab vs a plain transformers Trainer script", "",
                  "The baseline is `benchmarks/baselines/trainer_baseline.py`: transformers `Trainer` (+ peft for "
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
        for c in comps:
            if c["machine_count"] > 1:
                lines += [f"{c['peftlab']} vs {c['baseline']}: their cells ran on different machines "
                          f"({c['machines']}), so no throughput or memory ratio is given.", ""]

    cross = [(_get(r, "memory", "peak_rss_bytes"), _get(r, "memory", "parent_peak_rss_bytes")) for r in s.ok]
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
    if s.failed:
        lines += ["## Failed cells", "", "| cell | error |", "|---|---|"]
        for r in s.failed:
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
    return "\n".join(lines).rstrip() + "\n"


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
    paths["csv"] = write_text(out / "report.csv", render_csv(summary))
    comp = render_comparison_csv(summary)
    if comp is not None:
        paths["comparison_csv"] = write_text(out / "baseline_comparison.csv", comp)
    paths["markdown"] = write_text(out / "report.md", render_markdown(summary, results, plots))
    return {k: str(v) for k, v in paths.items()}
