"""Progress and log output for the CLI: rich bars on a terminal, plain single lines elsewhere (CI logs).

Why: rich's ``Progress`` on a non-terminal console draws nothing while it runs and one final bar at the
end, and the tqdm bars of transformers/datasets write carriage-return spam into log files. On a
non-terminal this prints one line per task update instead, at most every ``interval`` seconds plus the
first and the last, and switches the libraries' bars off. Verbosity: 0 (``-q``) prints no progress,
1 is the default, 2 (``-v``) adds library INFO logs and keeps their bars.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class _Task:
    started: float
    updated: float
    printed: float
    done: int = 0
    total: int = 0
    first_done: int = 0


class ProgressReporter:
    """A ``progress(task, done, total)`` callable; keeps per-task wall times for the closing summary."""

    def __init__(self, console: Any, verbosity: int = 1, interval: float = 10.0) -> None:
        self.console = console
        self.verbosity = verbosity
        self.interval = interval
        self.tasks: dict[str, _Task] = {}
        self._bars: Any = None
        self._ids: dict[str, Any] = {}

    @property
    def live(self) -> bool:
        """Rich bars only on an interactive terminal; plain lines otherwise."""
        return self.verbosity > 0 and self.console.is_terminal and not self.console.is_dumb_terminal

    def __enter__(self) -> ProgressReporter:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int) -> None:
        now = time.perf_counter()
        state = self.tasks.setdefault(task, _Task(now, now, float("-inf"), first_done=done))
        state.updated, state.done, state.total = now, done, total
        if self._bars is not None:
            if task not in self._ids:
                self._ids[task] = self._bars.add_task(task, total=total)
            self._bars.update(self._ids[task], completed=done, total=total)
        elif self.verbosity > 0 and (done >= total or now - state.printed >= self.interval):
            state.printed = now
            percent = f" ({done / total:.0%})" if total else ""
            self.console.print(
                f"{task}: {done}/{total}{percent} {now - state.started:.1f}s",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    def step_seconds(self) -> dict[str, tuple[int, float]]:
        """Per task: (steps, mean seconds per step), measured between its first and last update.

        Tasks report after each step, never before the first, so the first step's duration is unknown
        and the mean comes from the later ones; tasks seen only once are left out.
        """
        result = {}
        for name, t in self.tasks.items():
            if t.done > t.first_done:
                result[name] = (t.total, (t.updated - t.started) / (t.done - t.first_done))
        return result


def configure_logging(verbosity: int, interactive: bool) -> None:
    """Library log levels and tqdm bars for this verbosity (``interactive``: stderr is a terminal)."""
    level = {0: logging.ERROR, 1: logging.WARNING}.get(verbosity, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("minillm").setLevel(logging.DEBUG if verbosity > 2 else level)
    bars = verbosity >= 2 or (verbosity == 1 and interactive)
    try:
        import transformers

        transformers.logging.set_verbosity(level)
        (transformers.logging.enable_progress_bar if bars else transformers.logging.disable_progress_bar)()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    try:
        import datasets

        datasets.logging.set_verbosity(level)
        (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    except ImportError:  # pragma: no cover - datasets is a core dependency
        pass


@contextmanager
def progress_reporter(console: Any, verbosity: int = 1) -> Iterator[ProgressReporter]:
    with ProgressReporter(console, verbosity) as reporter:
        yield reporter


_STAGE_NAMES = {"loaded": "load", "scored": "scoring", "compensated": "compensation",
                "pruned": "plan+surgery", "exported": "export"}


def timings_line(stages: dict[str, float], steps: dict[str, tuple[int, float]], total: float) -> str:
    """``load 3.1 s · scoring 15.0 s (SPSA perturbations 16 × 0.8 s) · … · total 21.0 s``."""
    parts = []
    for stage, seconds in stages.items():
        text = f"{_STAGE_NAMES.get(stage, stage)} {seconds:.1f} s"
        if stage == "scored" and steps:
            text += " (" + ", ".join(f"{name} {n} × {s:.2f} s" for name, (n, s) in steps.items()) + ")"
        parts.append(text)
    parts.append(f"total {total:.1f} s")
    return "timings: " + " · ".join(parts)
