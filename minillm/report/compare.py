"""The compare report: the per-method table and one bar chart per numeric metric.

Input is deliberately loose so any producer can feed it: a list of rows, each a mapping, a dataclass, or
an object with ``to_dict()``/``as_dict()``. The label column is the first of ``method``, ``criterion``,
``name``, ``label`` present (else the first text column); every other column whose values are numbers
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
    if isinstance(row, Mapping):
        return dict(row)
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    for attr in ("to_dict", "as_dict"):
        if callable(getattr(row, attr, None)):
            return dict(getattr(row, attr)())
    raise UsageError(f"compare rows must be mappings or dataclasses (got {type(row).__name__})")


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
    numeric = [k for k in order if k != label and any(_is_number(r.get(k)) for r in rows)
               and all(r.get(k) is None or _is_number(r.get(k)) for r in rows)]
    return label or "", order, numeric


def render_compare_report(rows: Iterable[Any], path: str | Path, title: str = "minillm compare") -> list[Path]:
    from minillm.report import require_matplotlib

    require_matplotlib()
    data = [as_row(r) for r in rows]
    if not data:
        raise UsageError("nothing to report: compare produced no rows")
    label, order, numeric = columns(data)
    labels = [str(r.get(label, i)) for i, r in enumerate(data)] if label else [str(i) for i in range(len(data))]
    nested = [k for k in order if any(isinstance(r.get(k), (dict, list)) for r in data)]
    shown = [k for k in order if k not in nested]
    table = html.table(shown, [[r.get(k, "") if r.get(k) is not None else "-" for k in shown] for r in data])
    sections = [("Results", table)]
    written: list[Path] = []
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if numeric:
        png = figures.metrics_figure(labels, {k: [r.get(k) for r in data] for k in numeric})
        sections.append(("Metrics by method", html.figure(png, "One panel per numeric column of the table.",
                                                          "compare metrics")))
        file = target.with_name(f"{target.stem}.metrics.png")
        file.write_bytes(png)
        written.append(file)
    target.write_text(html.page(title, f"{len(data)} methods compared", sections))
    return [target, *written]
