"""A bench's records summarised per configuration: mean ± std over seeds, ratios, comparisons."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MIB = 2**20
HIDDEN_TEST_METRICS = ("loss", "examples", "completion_tokens", "windows")  # counts, not scores


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


def record_value(rec: dict, *path: str) -> Any:
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
        cols.append(Column(f"dev_{metric}", f"dev {metric}", lambda r, m=metric: record_value(r, "dev", m), "{:.4f}"))
    for m in test_names:
        cols.append(Column(f"test_{m}", f"test {m}", lambda r, m=m: record_value(r, "test", m), "{:.4f}"))
    cols += [
        Column("trainable_params", "trainable params", lambda r: record_value(r, "params", "trainable_params"), "{:,.0f}"),
        Column("trainable_pct", "trainable %", lambda r: record_value(r, "params", "trainable_pct"), "{:.3f}"),
        Column("trainable_head_params", "of which head", lambda r: record_value(r, "params", "trainable_head_params"), "{:,.0f}"),
        Column("trainable_pct_without_head", "trainable % w/o head",
               lambda r: record_value(r, "params", "trainable_pct_without_head"), "{:.3f}", markdown=False),
        Column("peft_trainable_params", "trainable params counted by peft",
               lambda r: record_value(r, "params", "peft_trainable_params"), "{:,.0f}", markdown=False),
        Column("total_params", "total params", lambda r: record_value(r, "params", "total_params"), "{:,.0f}", markdown=False),
        Column("peak_rss_mib", "peak RSS (MiB)", lambda r: _mib(record_value(r, "memory", "peak_rss_bytes")), "{:.0f}"),
        Column("parent_peak_rss_mib", "peak RSS seen by the bench (MiB)",
               lambda r: _mib(record_value(r, "memory", "parent_peak_rss_bytes")), "{:.0f}", markdown=False),
        Column("load_rss_mib", "model-load RSS (MiB)", lambda r: _mib(record_value(r, "memory", "load_rss_bytes")), "{:.0f}"),
    ]
    if any(r.get("plan") for r in records):  # `peftlab plan`'s prediction beside the measured values
        cols += [
            Column("planned_peak_mib", "predicted peak (MiB)", lambda r: _mib(record_value(r, "plan", "peak_bytes")), "{:.0f}"),
            Column("planned_samples_per_s", "predicted samples/s", lambda r: record_value(r, "plan", "samples_per_s"),
                   "{:.1f}", markdown=False),
        ]
    if any(record_value(r, "memory", "cuda_max_memory_allocated_bytes") is not None for r in records):
        cols += [
            Column("gpu_max_allocated_mib", "GPU max allocated (MiB)",
                   lambda r: _mib(record_value(r, "memory", "cuda_max_memory_allocated_bytes")), "{:.0f}"),
            Column("gpu_max_reserved_mib", "GPU max reserved (MiB)",
                   lambda r: _mib(record_value(r, "memory", "cuda_max_memory_reserved_bytes")), "{:.0f}"),
        ]
    cols += [
        Column("train_time_s", "train time (s)", lambda r: record_value(r, "time", "train_time_s"), "{:.1f}"),
        Column("samples_per_s", "samples/s", lambda r: record_value(r, "time", "samples_per_s"), "{:.1f}"),
        Column("tokens_per_s", "tokens/s", lambda r: record_value(r, "time", "tokens_per_s"), "{:.0f}"),
        Column("cell_wall_s", "cell wall time (s)", lambda r: r.get("cell_wall_s"), "{:.1f}", markdown=False),
        Column("size_mib", "saved size (MiB)", lambda r: _mib(record_value(r, "size", "model_dir_bytes")), "{:.2f}"),
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

    @property
    def metric_mode(self) -> str:
        """"min" when the main metric is loss-like (the runs say so in metrics.json), else "max"."""
        modes = [r.get("metric_mode") for r in self.ok if r.get("metric") == self.metric]
        return "min" if modes and all(m == "min" for m in modes) else "max"

    @property
    def stopped(self) -> list[dict]:
        """Sweep trials ended early by early stopping (not failures)."""
        return [r for r in self.failed if r.get("status") == "stopped"]


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
