"""The compare report: the per-method table and one bar chart per numeric metric.

Input is deliberately loose so any producer can feed it: a list of rows (or an object with ``.rows``,
such as :class:`minillm.compare.CompareResult`), each a mapping, a dataclass, or an object with
``to_dict()``/``as_dict()``; nested mappings (per-task accuracy) become one column per key.
The label column is the first of ``method``, ``criterion``, ``name``, ``label``
present (else the first text column); every other column whose values are numbers
gets a chart. Column order follows the rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from minillm.errors import UsageError
from minillm.report import figures, html

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
        for k in ("allocation", "ratio", "head_mode", "structures")
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
    from minillm.report import require_matplotlib

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
