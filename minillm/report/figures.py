"""Report plots as PNG bytes. Pure: plain lists/dicts in, image out; matplotlib's object API, no pyplot state.

Why ``Figure`` rather than ``pyplot``: no global figure registry and no GUI backend, so reports can be
made from threads, notebooks and headless CI alike.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

KEPT, REMOVED, ACCENT = "#2f6db5", "#c9d1da", "#c2410c"


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def widths_figure(layers: Sequence[Mapping[str, int]]) -> bytes:
    """Per-layer kept query heads, key/value heads and MLP channels, over the original width (grey)."""
    fig, axes = _figure(11, 7.2, 3, 1, sharex=True)
    index = [row["layer"] for row in layers]
    panels = (("heads", "query heads"), ("kv_heads", "key/value heads"), ("channels", "MLP channels"))
    for ax, (key, label) in zip(axes[:, 0], panels, strict=True):
        ax.bar(
            index,
            [row[f"{key}_before"] for row in layers],
            color=REMOVED,
            label="removed",
            width=0.8,
            edgecolor="#8c959f",
            linewidth=0.5,
        )
        ax.bar(index, [row[key] for row in layers], color=KEPT, label="kept", width=0.8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper right", ncols=2, frameon=False)
    fig.suptitle("Kept width per decoder layer")
    axes[-1, 0].set_xlabel("decoder layer")
    axes[-1, 0].set_xticks(index if len(index) <= 40 else index[:: math.ceil(len(index) / 40)])
    return _png(fig)


def _scale(ax: Any, values: Sequence[float]) -> None:
    """Log scale only when the values span more than 20x (scores often do); linear otherwise."""
    if not values or max(values) <= 0:
        return
    if min(values) > 0:
        if max(values) / min(values) > 20:
            ax.set_yscale("log")
    elif (
        max(abs(v) for v in values) / max(min(abs(v) for v in values if v) if any(values) else 1.0, 1e-30)
        > 20
    ):
        ax.set_yscale(
            "symlog", linthresh=max(1e-12, min(abs(v) for v in values if v) if any(values) else 1.0)
        )


def scores_figure(scores: Mapping[int, Mapping[str, Sequence[float]]]) -> bytes:
    """Distribution of group scores per scored layer: MLP channels (box plots) and attention heads (dots)."""
    fig, axes = _figure(11, 6.4, 2, 1, sharex=True)
    layers = sorted(scores)
    channels = [list(scores[i]["channels"]) for i in layers]
    ax = axes[0, 0]
    ax.boxplot(
        channels,
        positions=layers,
        widths=0.6,
        showfliers=True,
        flierprops={"markersize": 2, "alpha": 0.4},
        medianprops={"color": ACCENT},
        patch_artist=True,
        boxprops={"facecolor": "#dbe7f5"},
    )
    _scale(ax, [v for c in channels for v in c])
    ax.set_ylabel("MLP channel score")
    ax.set_title("Score distributions per layer (higher = more important)")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1, 0]
    heads = [v for i in layers for v in scores[i]["heads"]]
    ax.scatter([i for i in layers for _ in scores[i]["heads"]], heads, s=14, color=KEPT, alpha=0.7)
    _scale(ax, heads)
    ax.set_ylabel("query-head score")
    ax.set_xlabel("decoder layer")
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(layers if len(layers) <= 40 else layers[:: math.ceil(len(layers) / 40)])
    return _png(fig)


def _merged_marks(marks: Sequence[Mapping[str, Any]], span: float) -> list[tuple[float, str]]:
    """Stage labels, with marks closer than 3% of the run merged into one label ("scored / pruned")."""
    merged: list[tuple[float, str]] = []
    for s in marks:
        if merged and s["seconds"] - merged[-1][0] < 0.03 * span:
            merged[-1] = (merged[-1][0], f"{merged[-1][1]} / {s['stage']}")
        else:
            merged.append((s["seconds"], s["stage"]))
    return merged


def _count_unit(largest: float) -> tuple[float, str]:
    return (
        (1e9, "B")
        if largest >= 1e9
        else (1e6, "M")
        if largest >= 1e6
        else (1e3, "K")
        if largest >= 1e3
        else (1, "")
    )


def timeline_figure(samples: Sequence[Mapping[str, Any]]) -> bytes:
    """Resident memory (and CUDA memory) at each sample, with stage marks and the parameter count.

    Samples are taken at stage marks and scoring steps only (no background thread), so points are
    joined by dashed lines: memory between two samples is not observed.
    """
    fig, axes = _figure(11, 4.2)
    ax = axes[0, 0]
    t = [s["seconds"] for s in samples]
    span = max(t[-1] - t[0], 1e-9)
    line = {"marker": "o", "markersize": 4, "linestyle": "--", "linewidth": 1}
    ax.plot(t, [s["rss_bytes"] / 2**20 for s in samples], color=KEPT, label="process RSS", **line)
    if any(s.get("cuda_bytes") is not None for s in samples):
        ax.plot(
            t,
            [(s.get("cuda_bytes") or 0) / 2**20 for s in samples],
            color="#6b21a8",
            label="CUDA allocated",
            **line,
        )
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("memory (MiB)")
    ax.grid(alpha=0.3)
    marks = [s for s in samples if s.get("params") is not None or s["stage"] == "start"]
    for seconds, label in _merged_marks(marks, span):
        ax.axvline(seconds, color="#8c959f", linestyle=":", linewidth=1)
        ax.annotate(
            label,
            (seconds, 0.98),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="#57606a",
        )
    counted = [s for s in samples if s.get("params") is not None]
    if counted:
        scale, unit = _count_unit(max(s["params"] for s in counted))
        twin = ax.twinx()
        twin.step(
            [s["seconds"] for s in counted],
            [s["params"] / scale for s in counted],
            where="post",
            color=ACCENT,
            marker="s",
            label="parameters",
        )
        twin.set_ylabel(f"parameters ({unit})" if unit else "parameters", color=ACCENT)
        twin.set_ylim(0, max(s["params"] for s in counted) / scale * 1.15)
        twin.legend(loc="lower right", frameon=False)
    ax.legend(loc="lower left", frameon=False)
    ax.set_title("Memory and parameters over the run")
    return _png(fig)


def metrics_figure(labels: Sequence[str], metrics: Mapping[str, Sequence[float | None]]) -> bytes:
    """One small bar chart per metric, methods side by side (missing values left blank)."""
    names = list(metrics)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = _figure(3.8 * cols, 2.9 * rows, rows, cols)
    palette = ["#2f6db5", "#c2410c", "#15803d", "#6b21a8", "#b45309", "#0e7490", "#be123c", "#4d7c0f"]
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        values = metrics[names[k]]
        ax.bar(
            range(len(labels)),
            [v if v is not None else 0 for v in values],
            color=[palette[i % len(palette)] for i in range(len(labels))],
        )
        for i, v in enumerate(values):
            if v is not None:
                ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(names[k], fontsize=10)
        ax.set_xticks(
            range(len(labels)),
            labels,
            rotation=30 if len(labels) > 3 else 0,
            ha="right" if len(labels) > 3 else "center",
            fontsize=8,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return _png(fig)
