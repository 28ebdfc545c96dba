"""Reports: a self-contained HTML page (plots embedded, PNGs written beside it) for prune and compare.

``write_prune_report(result, "report.html")`` after :func:`minillm.api.prune` (or ``--report`` on the
command line); ``render_compare_report(rows, "compare.html")`` for a list of per-method rows such as
``minillm compare`` produces. matplotlib is imported only here, when a report is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minillm.errors import UsageError


def require_matplotlib() -> None:
    """Fail with the extra to install when matplotlib is missing (reports are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("reports need matplotlib: pip install 'minillm-prune[report]'") from None


def write_prune_report(result: Any, path: str | Path) -> list[Path]:
    """Write the HTML report of a :class:`~minillm.api.PruneResult` and its PNGs; returns the files."""
    from minillm.report.prune import write_prune_report as write

    return write(result, path)


def render_compare_report(rows: Any, path: str | Path, title: str = "minillm compare") -> list[Path]:
    """Write the HTML report (table + one bar chart per metric) of per-method rows; returns the files."""
    from minillm.report.compare import render_compare_report as render

    return render(rows, path, title)


__all__ = ["render_compare_report", "require_matplotlib", "write_prune_report"]
