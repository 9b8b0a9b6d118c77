"""The report's plots: test metric against trainable parameters and against peak memory."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .summary import Summary


def plot_points(summary: Summary, x_key: str, x_label: str, log_x: bool, title: str) -> Optional[bytes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = summary.metric
    pts = []
    for row in summary.rows:
        y = row.stats.get(f"test_{m}")
        x = row.stats.get(x_key)
        if y is None or x is None or y.mean is None or x.mean is None or (log_x and x.mean <= 0):
            continue
        pts.append((row, x, y))
    if not pts:
        return None
    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for row, x, y in pts:
        baseline = row.first("kind") == "baseline"
        ax.errorbar(x.mean, y.mean, yerr=y.std or 0.0, xerr=(x.std or 0.0) if not log_x else None,
                    fmt="s" if baseline else "o", capsize=4, markersize=7,
                    markerfacecolor="none" if baseline else None)
        ax.annotate(row.config, (x.mean, y.mean), textcoords="offset points", xytext=(6, 5), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"test {m} (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
