"""The report's search section, for specs whose configurations vary keys (a `grid` or `sample`, as
`peftlab sweep` runs them): the best configuration by the dev metric, every configuration's values
and dev/test metric (trials stopped early included), and the dev metric against each varied key."""

from __future__ import annotations

import io
from typing import Any, Optional

from .summary import Summary

SKIP_AXES = ("backbone.name", "backbone.quantization")  # shown in the main table already


def varied_keys(records: list[dict]) -> list[str]:
    """Keys whose value differs between the configurations, in the spec's order."""
    keys: dict[str, set] = {}
    for r in records:
        for k, v in (r.get("axes") or {}).items():
            if k not in SKIP_AXES:
                keys.setdefault(k, set()).add(repr(v))
    return [k for k, values in keys.items() if len(values) > 1]


def _trials(s: Summary) -> list[dict]:
    return [r for r in s.ok + s.stopped if (r.get("dev") or {}).get(s.metric) is not None]


def _best(s: Summary, trials: list[dict]) -> Optional[dict]:
    """The configuration with the best mean dev metric over its seeds (finished runs only)."""
    by_config: dict[str, list[float]] = {}
    for r in trials:
        if r.get("status") == "ok":
            by_config.setdefault(r["config"], []).append(r["dev"][s.metric])
    if not by_config:
        return None
    pick = min if s.metric_mode == "min" else max
    config = pick(by_config, key=lambda c: sum(by_config[c]) / len(by_config[c]))
    return {"config": config, "dev": sum(by_config[config]) / len(by_config[config]),
            "record": next(r for r in trials if r["config"] == config)}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _axis(r: dict, key: str) -> str:
    """A trial's value of ``key``; "–" where its configuration does not vary that key (its recipe's
    value ran). A key varied to null still reads None."""
    axes = r.get("axes") or {}
    return _fmt(axes[key]) if key in axes else "–"


def search_lines(s: Summary, plots: dict[str, str]) -> list[str]:
    trials = _trials(s)
    keys = varied_keys(trials)
    if not s.metric or not keys:
        return []
    m = s.metric
    lines = ["## Search", ""]
    best = _best(s, trials)
    if best is not None:
        axes = best["record"].get("axes") or {}
        values = ", ".join(f"{k} {_fmt(axes[k])}" for k in keys if k in axes)
        test = (best["record"].get("test") or {}).get(m)
        lines += [f"Best by dev {m} ({'lower' if s.metric_mode == 'min' else 'higher'} is better): "
                  f"`{best['config']}` ({values}): dev {m} {best['dev']:.4f}"
                  + (f", test {m} {test:.4f}" if test is not None else "") + ".", ""]
    lines += ["| cell | " + " | ".join(keys) + f" | dev {m} | test {m} | status |",
              "|---|" + "---:|" * (len(keys) + 2) + "---|"]
    for r in sorted(trials, key=lambda r: r["cell"]):
        test = (r.get("test") or {}).get(m)
        lines.append(f"| {r['cell']} | " + " | ".join(_axis(r, k) for k in keys)
                     + f" | {r['dev'][m]:.4f} | {'' if test is None else f'{test:.4f}'} | "
                     + ("stopped early" if r.get("status") == "stopped" else "ok") + " |")
    if any(k not in (r.get("axes") or {}) for r in trials for k in keys):
        lines.append("\n–: not varied in that configuration (its recipe's value, with the configuration's overrides).")
    lines.append("")
    for caption, name in plots.items():
        lines += [f"![{caption}]({name})", ""]
    return lines


def search_plots(s: Summary) -> dict[str, bytes]:
    """``{file name: PNG}``: the dev metric of every trial against each varied key."""
    trials = _trials(s)
    out = {}
    for key in varied_keys(trials) if s.metric else []:
        pts = [((r.get("axes") or {}).get(key), r["dev"][s.metric], r.get("status") == "stopped") for r in trials]
        pts = [p for p in pts if isinstance(p[0], (int, float)) and not isinstance(p[0], bool)]
        if pts:
            out[f"search_{key}.png"] = _plot(pts, key, s)
    return out


def _plot(pts: list[tuple], key: str, s: Summary) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for stopped in (False, True):
        xs = [x for x, _, st in pts if st == stopped]
        ys = [y for _, y, st in pts if st == stopped]
        if xs:
            ax.plot(xs, ys, "x" if stopped else "o", color="tab:gray" if stopped else "tab:blue",
                    label="stopped early (best dev so far)" if stopped else "ran to the end")
    xs = [x for x, _, _ in pts]
    if min(xs) > 0 and max(xs) / min(xs) >= 10 and not all(float(x).is_integer() for x in xs):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"dev {s.metric}")
    ax.set_title(f"{s.title}: dev {s.metric} vs {key}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()

