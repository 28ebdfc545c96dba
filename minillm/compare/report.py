"""Outputs of ``minillm compare``: a markdown table, a CSV, (several ratios) a perplexity-vs-ratio plot,
and with ``--report`` an HTML page in the look of prune's report (:func:`render_compare_report`).

Kept apart from :mod:`minillm.compare` so the orchestration reads top to bottom without formatting code.

The HTML report's input is deliberately loose: a list of rows (or an object with ``.rows``, such as
:class:`minillm.compare.CompareResult`), each a mapping, a dataclass, or an object with
``to_dict()``/``as_dict()``; nested mappings (per-task accuracy) become one column per key. The label
column is the first of ``method``, ``criterion``, ``name``, ``label`` present (else the first text
column); every other column whose values are numbers (and not constant) gets a chart.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from minillm.errors import UsageError
from minillm.memory import human_bytes

COLUMNS = (
    "method",
    "allocation",
    "compensation",
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
    """The compare table, one row per (method, ratio, allocation, compensation), plus the dense and forward
    references."""
    tasks = _tasks(result)
    head = [
        "method",
        "alloc",
        "comp",
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
        "| dense | - | - | 0 | 0 | "
        + f"{result.dense_params:,} | {dense_ppl} | "
        + " | ".join(
            ["-"] * len(tasks)
            + [human_bytes(result.forward_peak_bytes), "1.00", f"{result.forward_seconds or 0:.1f}", "1", "0"]
        )
        + " |"
    )
    for row in sorted(result.rows, key=lambda r: (r.ratio, r.allocation, r.compensation or "",
                                                  r.perplexity or float("inf"))):
        ppl = "-" if row.perplexity is None else f"{row.perplexity:.2f}"
        ratio_vs = "-" if row.peak_vs_forward is None else f"{row.peak_vs_forward:.2f}"
        cells = [
            row.method,
            row.allocation,
            row.compensation or "-",
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
    # one line (and colour, in every panel) per method, or per method and compensation when both vary
    series = sorted({(r.method, r.compensation or "") for r in result.rows})
    several = len({c for _, c in series}) > 1
    colours = plt.get_cmap("tab20" if len(series) > 10 else "tab10")
    fig, axes = plt.subplots(1, len(allocations), figsize=(4.2 * len(allocations) + 2.2, 4.5), sharey=True,
                             squeeze=False)
    for ax, allocation in zip(axes[0], allocations, strict=True):
        for number, (method, mode) in enumerate(series):
            rows = sorted((r for r in result.rows
                           if (r.method, r.compensation or "", r.allocation) == (method, mode, allocation)),
                          key=lambda r: r.ratio)
            points = [(r.achieved_ratio, r.perplexity) for r in rows if r.perplexity is not None]
            if points:
                label = f"{method} ({mode})" if several else method
                ax.plot(*zip(*points, strict=True), marker="o", color=colours(number), label=label)
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


# ------------------------------------------------------------------------------------------- HTML
LABEL_KEYS = ("method", "criterion", "name", "label")


def as_row(row: Any) -> dict[str, Any]:
    """A flat dict: nested mappings (e.g. ``accuracy: {piqa: …}``) become ``accuracy.piqa`` columns."""
    if isinstance(row, Mapping):
        data = dict(row)
    elif dataclasses.is_dataclass(row) and not isinstance(row, type):
        data = dataclasses.asdict(row)
    elif callable(getattr(row, "to_dict", None)) or callable(getattr(row, "as_dict", None)):
        data = dict((getattr(row, "to_dict", None) and row.to_dict()) or row.as_dict())
    else:
        raise UsageError(f"compare rows must be mappings or dataclasses (got {type(row).__name__})")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def row_labels(rows: list[dict[str, Any]], label: str) -> list[str]:
    """The label column, extended by the text/ratio columns that vary when labels alone repeat."""
    labels = [str(r.get(label, i)) if label else str(i) for i, r in enumerate(rows)]
    if len(set(labels)) == len(labels):
        return labels
    extra = [
        k
        for k in ("allocation", "compensation", "ratio", "head_mode", "structures")
        if len({str(r.get(k)) for r in rows}) > 1
    ]
    return [" ".join([labels[i], *(str(rows[i].get(k)) for k in extra)]) for i in range(len(rows))]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def columns(rows: list[dict[str, Any]]) -> tuple[str, list[str], list[str]]:
    """(label column, every column in order, numeric columns to plot)."""
    order: list[str] = []
    for row in rows:
        order += [k for k in row if k not in order]
    label = next((k for k in LABEL_KEYS if k in order), None)
    if label is None:
        label = next((k for k in order if all(isinstance(r.get(k), str) for r in rows)), None)
    numeric = [
        k
        for k in order
        if k != label
        and any(_is_number(r.get(k)) for r in rows)
        and all(r.get(k) is None or _is_number(r.get(k)) for r in rows)
    ]
    return label or "", order, numeric


def _cell(key: str, value: Any) -> Any:
    if value is None:
        return "-"
    if key.endswith("_bytes") and _is_number(value):
        from minillm.memory import human_bytes

        return human_bytes(int(value))
    return value


def render_compare_report(
    rows: Iterable[Any], path: str | Path, title: str = "minillm compare"
) -> list[Path]:
    from minillm.report import figures, html, require_matplotlib

    require_matplotlib()
    if hasattr(rows, "rows"):  # a whole CompareResult
        rows = rows.rows
    data = [as_row(r) for r in rows]
    if not data:
        raise UsageError("nothing to report: compare produced no rows")
    label, order, numeric = columns(data)
    labels = row_labels(data, label)
    nested = [k for k in order if any(isinstance(r.get(k), (dict, list)) for r in data)]
    shown = [k for k in order if k not in nested]
    table = html.table(shown, [[_cell(k, r.get(k)) for k in shown] for r in data])
    sections = [("Results", table)]
    written: list[Path] = []
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    numeric = [k for k in numeric if len({r.get(k) for r in data}) > 1]  # a constant column says nothing
    if numeric:
        metrics = {
            (f"{k} (MiB)" if k.endswith("_bytes") else k): [
                None if r.get(k) is None else (r[k] / 2**20 if k.endswith("_bytes") else r[k]) for r in data
            ]
            for k in numeric
        }
        png = figures.metrics_figure(labels, metrics)
        sections.append(
            (
                "Metrics by method",
                html.figure(png, "One panel per numeric column of the table.", "compare metrics"),
            )
        )
        file = target.with_name(f"{target.stem}.metrics.png")
        file.write_bytes(png)
        written.append(file)
    target.write_text(html.page(title, f"{len(data)} methods compared", sections))
    return [target, *written]
