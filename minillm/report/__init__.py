"""Reports: a self-contained HTML page (plots embedded, PNGs written beside it).

``write_prune_report(result, "report.html")`` after :func:`minillm.api.prune` (or ``--report`` on the
command line); compare's page (same look, same :mod:`~minillm.report.html` / :mod:`~minillm.report.figures`
pieces) is written by :mod:`minillm.compare.report`. matplotlib is imported only when a report is asked for.
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


__all__ = ["require_matplotlib", "write_prune_report"]
