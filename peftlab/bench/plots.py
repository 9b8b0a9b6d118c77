"""The report's plots: test metric against trainable parameters and against peak memory.

Labels are placed so that no two overlap (crowded clusters get leader lines); an outlier far below
or above the rest is drawn at the edge of a zoomed axis with its value, so it cannot squash the band
that matters; a legend says which markers are peftlab and which the Trainer baselines."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .summary import Summary

# label offsets in points from the point, tried in order: beside it first, then further up and down
OFFSETS = [(dx, dy) for step in range(14) for dy in ((5 + 11 * step), -(12 + 11 * step)) for dx in (6, -6)]


def plot_points(summary: Summary, x_key: str, x_label: str, log_x: bool, title: str) -> Optional[bytes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = summary.metric
    pts = _points(summary, x_key, log_x)
    if not pts:
        return None
    fig = Figure(figsize=(8, 5.5), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    band = _band([y.mean for _, _, y in pts])
    labels = []
    for row, x, y in pts:
        labels.append(_draw_point(ax, row, x, y, band, log_x))
    if log_x:
        ax.set_xscale("log")
    if band:
        ax.set_ylim(*band)
    seeds = max(y.n for _, _, y in pts)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"test {m} (mean ± std over {seeds} seeds)" if seeds > 1 else f"test {m} (one seed)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, any(row.first("kind") == "baseline" for row, _, _ in pts))
    fig.tight_layout()
    place_labels(ax, labels, canvas.get_renderer())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _points(summary: Summary, x_key: str, log_x: bool) -> list:
    pts = []
    for row in summary.rows:
        y, x = row.stats.get(f"test_{summary.metric}"), row.stats.get(x_key)
        if y is None or x is None or y.mean is None or x.mean is None or (log_x and x.mean <= 0):
            continue
        pts.append((row, x, y))
    return pts


def _band(ys: list[float]) -> Optional[tuple[float, float]]:
    """The y range of the points that are not outliers (beyond 3 interquartile ranges, with at least
    four points), padded; None when there is no outlier."""
    if len(ys) < 4:
        return None
    s = sorted(ys)
    q1, q3 = s[len(s) // 4], s[(3 * len(s)) // 4]
    spread = max(q3 - q1, 1e-3 * max(abs(q3), 1e-9), 0.01 * (s[-1] - s[0]))
    inside = [y for y in ys if q1 - 3 * spread <= y <= q3 + 3 * spread]
    if len(inside) == len(ys) or not inside:
        return None
    pad = max(0.15 * (max(inside) - min(inside)), 0.01)
    return min(inside) - pad, max(inside) + pad


def _draw_point(ax: Any, row: Any, x: Any, y: Any, band: Optional[tuple], log_x: bool) -> tuple:
    """The point (or, off the zoomed band, a triangle at its edge); returns (x, y, label text)."""
    baseline = row.first("kind") == "baseline"
    label, y_drawn = row.config, y.mean
    if band and not band[0] <= y.mean <= band[1]:
        y_drawn = band[0] if y.mean < band[0] else band[1]
        ax.plot(x.mean, y_drawn, "v" if y.mean < band[0] else "^", color="tab:red", markersize=9, clip_on=False)
        label = f"{row.config}: {y.mean:.4f} (off scale)"
    else:
        ax.errorbar(x.mean, y.mean, yerr=y.std or 0.0, xerr=(x.std or 0.0) if not log_x else None,
                    fmt="s" if baseline else "o", capsize=4, markersize=7, color="tab:blue",
                    markerfacecolor="none" if baseline else "tab:blue")
    return x.mean, y_drawn, label


def _legend(ax: Any, with_baselines: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="none", color="tab:blue", label="peftlab")]
    if with_baselines:
        handles.append(Line2D([], [], marker="s", linestyle="none", color="tab:blue", markerfacecolor="none",
                              label="transformers Trainer script"))
    ax.legend(handles=handles, fontsize=8, loc="best")


def place_labels(ax: Any, points: list[tuple], renderer: Any) -> list:
    """Annotate each (x, y, text) at the first offset whose box overlaps no label placed before and
    stays inside the axes; returns the label boxes (display coordinates)."""
    boxes: list = []
    inside = ax.get_window_extent(renderer)
    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        placed, fallback = None, None
        for dx, dy in OFFSETS:
            ann = _annotate(ax, x, y, text, dx, dy)
            box = _text_box(ann, renderer)
            free = not any(box.overlaps(b) for b in boxes)
            if free and inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1):
                placed = box
                break
            fallback = fallback or ((dx, dy) if free else None)  # free, but past the axes
            ann.remove()
        if placed is None:
            placed = _text_box(_annotate(ax, x, y, text, *(fallback or OFFSETS[0])), renderer)
        boxes.append(placed)
    return boxes


def _text_box(ann: Any, renderer: Any) -> Any:
    """The label's own box, without its leader line (which may cross other labels' points)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _annotate(ax: Any, x: float, y: float, text: str, dx: float, dy: float) -> Any:
    far = abs(dy) > 16
    return ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                       ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                       arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.6} if far else None)
