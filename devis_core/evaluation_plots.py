"""Pictures and tables of YouTube-VIS metrics (the dicts of ``devis_core.evaluation.evaluate_tracks``)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .evaluation import STAT_NAMES

# Bars of categories without ground truth (AP = -1) are drawn at 0 in this grey and labelled "n/a".
NO_GT_COLOR = "#bbbbbb"
BAR_COLOR = "#4363d8"


def per_category_ap(metrics: dict, sort: bool = True) -> list[tuple[str, int, float | None]]:
    """(name, category id, AP × 100 or None without ground truth) per category.

    metrics: a dict with ``per_category`` = [{"category_id", "name", "AP", ...}] (AP in [0, 1], -1 when
    the category has no ground truth). ``sort``: highest AP first, categories without ground truth last;
    otherwise the metrics' order.
    """
    if "per_category" not in metrics:
        raise KeyError("metrics: no 'per_category' list (expected the output of evaluation.evaluate_tracks)")
    rows = []
    for i, cat in enumerate(metrics["per_category"]):
        for key in ("category_id", "name", "AP"):
            if key not in cat:
                raise KeyError(f"metrics: per_category[{i}] lacks '{key}'")
        ap = float(cat["AP"])
        rows.append((str(cat["name"]), int(cat["category_id"]), None if ap < 0 else 100.0 * ap))
    if sort:
        rows.sort(key=lambda r: (r[2] is None, -(r[2] or 0.0), r[1]))
    return rows


def plot_per_category_ap(metrics: dict, sort: bool = True, title: str | None = None) -> Figure:
    """Horizontal bar chart of per-category AP (× 100, IoU 0.50:0.95), one bar per category.

    Categories without ground truth get a grey "n/a" bar at 0; the mean AP is drawn as a dashed line.
    Returns a matplotlib Figure (no pyplot state), e.g. for ``visualize.figure_to_png``.
    """
    rows = per_category_ap(metrics, sort)
    fig = Figure(figsize=(7.0, 0.9 + 0.32 * max(len(rows), 1)))
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(rows))
    values = [0.0 if ap is None else ap for _, _, ap in rows]
    colors = [NO_GT_COLOR if ap is None else BAR_COLOR for _, _, ap in rows]
    ax.barh(positions, values, color=colors)
    ax.set_yticks(positions, [f"{name} ({cid})" for name, cid, _ in rows])
    ax.invert_yaxis()          # first row at the top
    for y, (_, _, ap) in zip(positions, rows):
        ax.text(0.5 if ap is None else ap + 0.5, y, "n/a" if ap is None else f"{ap:.1f}", va="center", fontsize=8)
    mean_ap = metrics.get("AP")
    if mean_ap is not None and mean_ap >= 0:
        ax.axvline(100.0 * mean_ap, color="k", linestyle="--", linewidth=1, label=f"AP {100.0 * mean_ap:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_xlabel("AP (IoU 0.50:0.95) × 100")
    ax.set_title(title or "Per-category AP")
    fig.tight_layout()
    return fig


def metrics_table(metrics: dict) -> list[tuple[str, str]]:
    """The twelve summary numbers as (name, value × 100 with one decimal, or 'n/a' for -1) rows."""
    missing = [n for n in STAT_NAMES if n not in metrics]
    if missing:
        raise KeyError(f"metrics: missing {missing} (expected the output of evaluation.evaluate_tracks)")
    return [(name, "n/a" if metrics[name] < 0 else f"{100.0 * metrics[name]:.1f}") for name in STAT_NAMES]


def metrics_table_html(metrics: dict) -> str:
    """:func:`metrics_table` as a two-row HTML table (names, values) for notebooks."""
    rows = metrics_table(metrics)
    head = "".join(f"<th>{name}</th>" for name, _ in rows)
    body = "".join(f"<td>{value}</td>" for _, value in rows)
    return f"<table><tr>{head}</tr><tr>{body}</tr></table>"
