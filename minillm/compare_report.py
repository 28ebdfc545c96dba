"""Outputs of ``minillm compare``: a markdown table, a CSV and (several ratios) a perplexity-vs-ratio plot.

Kept apart from :mod:`minillm.compare` so the orchestration reads top to bottom without formatting code.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from minillm.memory import human_bytes

COLUMNS = (
    "method",
    "allocation",
    "ratio",
    "achieved_ratio",
    "params",
    "perplexity",
    "peak_bytes",
    "peak_vs_forward",
    "scoring_seconds",
    "forward_passes",
    "backward_passes",
)


def _tasks(result: Any) -> list[str]:
    return sorted({task for row in result.rows for task in row.accuracy})


def markdown_table(result: Any) -> str:
    """The compare table, one row per (method, ratio, allocation), plus the dense and forward references."""
    tasks = _tasks(result)
    head = [
        "method",
        "alloc",
        "ratio",
        "achieved",
        "params",
        "ppl",
        *tasks,
        "peak mem (scoring)",
        "× forward",
        "scoring s",
        "fwd",
        "bwd",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense_ppl = "-" if result.dense_perplexity is None else f"{result.dense_perplexity:.2f}"
    lines.append(
        "| dense | - | 0 | 0 | "
        + f"{result.dense_params:,} | {dense_ppl} | "
        + " | ".join(
            ["-"] * len(tasks)
            + [human_bytes(result.forward_peak_bytes), "1.00", f"{result.forward_seconds or 0:.1f}", "1", "0"]
        )
        + " |"
    )
    for row in sorted(result.rows, key=lambda r: (r.ratio, r.allocation, r.perplexity or float("inf"))):
        ppl = "-" if row.perplexity is None else f"{row.perplexity:.2f}"
        ratio_vs = "-" if row.peak_vs_forward is None else f"{row.peak_vs_forward:.2f}"
        cells = [
            row.method,
            row.allocation,
            f"{row.ratio:g}",
            f"{row.achieved_ratio:.3f}",
            f"{row.params:,}",
            ppl,
            *[f"{row.accuracy.get(t, float('nan')):.3f}" for t in tasks],
            human_bytes(row.peak_bytes),
            ratio_vs,
            f"{row.scoring_seconds:.1f}",
            str(row.forward_passes),
            str(row.backward_passes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(result: Any, path: Path) -> None:
    tasks = _tasks(result)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*COLUMNS, *(f"acc_{t}" for t in tasks)])
        writer.writerow(
            [
                "dense",
                "",
                0,
                0,
                result.dense_params,
                result.dense_perplexity,
                result.forward_peak_bytes,
                1.0,
                result.forward_seconds,
                1,
                0,
                *([""] * len(tasks)),
            ]
        )
        for row in result.rows:
            writer.writerow([getattr(row, c) for c in COLUMNS] + [row.accuracy.get(t, "") for t in tasks])


def plot(result: Any, path: Path) -> bool:
    """Perplexity vs achieved ratio, one line per (method, allocation); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    allocations = sorted({r.allocation for r in result.rows}, key=lambda a: a != "uniform")
    methods = sorted({r.method for r in result.rows})
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    fig, axes = plt.subplots(1, len(allocations), figsize=(4.2 * len(allocations) + 2.2, 4.5), sharey=True,
                             squeeze=False)
    for ax, allocation in zip(axes[0], allocations, strict=True):
        for number, method in enumerate(methods):  # one colour per method in every panel
            rows = sorted((r for r in result.rows if (r.method, r.allocation) == (method, allocation)),
                          key=lambda r: r.ratio)
            points = [(r.achieved_ratio, r.perplexity) for r in rows if r.perplexity is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colours(number), label=method)
        if result.dense_perplexity is not None:
            ax.axhline(result.dense_perplexity, color="grey", linewidth=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_title(f"{allocation} allocation")
        ax.set_xlabel("parameters removed (achieved ratio)")
    axes[0][0].set_ylabel("perplexity (log scale)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: Any, out_dir: Path) -> list[Path]:
    """``compare.md``, ``compare.csv`` and, with several ratios, ``compare.png`` under ``out_dir``."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "compare.md", out_dir / "compare.csv", out_dir / "compare.json"]
    protocol = ", ".join(f"{k}={v}" for k, v in result.protocol.items())
    files[0].write_text(f"Protocol: {protocol}\n\n" + markdown_table(result))
    write_csv(result, files[1])
    files[2].write_text(
        json.dumps(
            {
                "protocol": result.protocol,
                "dense_params": result.dense_params,
                "dense_perplexity": result.dense_perplexity,
                "forward_peak_bytes": result.forward_peak_bytes,
                "rows": [vars(r) for r in result.rows],
            },
            indent=1,
            default=str,
        )
    )
    if len({r.ratio for r in result.rows}) > 1 and plot(result, out_dir / "compare.png"):
        files.append(out_dir / "compare.png")
    return files
