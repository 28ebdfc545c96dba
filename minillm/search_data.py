"""Which windows rank the ``--search`` candidates: the calibration set's last quarter, or a text of the
user's (``--search-data``).

Why a choice: the last quarter of the calibration windows is a small ranking set drawn from the
calibration text itself, and candidates a few thousandths of a nat apart on it can rank the other way
on another text (docs/benchmarks.md, "Searched mix": SmolLM2-135M at 0.2, 32 windows of wiki.train
put a 29-layer mix 0.008 nats ahead of the width-only plan, which is 3.5 % better in wiki.test
perplexity). ``--search-data`` ranks on a held-out text the user chooses (a validation split), and then
no calibration window need be held back: each candidate is compensated on all of them, as the final
prune is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError


def split_windows(calibration: CalibrationSet, samples: int | None, held_out: CalibrationSet | None = None
                  ) -> tuple[CalibrationSet, CalibrationSet]:
    """(fit, held-out) windows for ranking: the held-out part is the *last* ``max(1, samples // 4)`` windows
    of the calibration set, the fit part its first ``samples - held`` — disjoint by construction.
    ``samples=None``: the whole calibration set. Why the default is all of it: the refit gains with data
    (54.2 → 39.4 wiki.test perplexity from 32 to 128 windows at 0.2), width cuts far more than depth cuts,
    so a ranking compensated on fewer windows than the final prune favours depth (docs/benchmarks.md,
    "Searched mix"). With ``held_out`` (the ``--search-data`` windows) nothing is held back: the fit part
    is the first ``samples`` windows (default all, exactly what the final prune compensates on)."""
    n = int(calibration.input_ids.shape[0])
    samples = n if samples is None else min(samples, n)
    if held_out is not None:
        return CalibrationSet(calibration.input_ids[:samples], calibration.batch_size), held_out
    if samples < 2:
        raise UsageError(f"--search needs at least 2 calibration windows to hold some out (got {n}); "
                         "raise --calib-samples and --search-calib-samples")
    held = max(1, samples // 4)
    ids = calibration.input_ids
    return (CalibrationSet(ids[: samples - held], calibration.batch_size),
            CalibrationSet(ids[n - held:], calibration.batch_size))


def held_out_set(tokenizer: Any, run: dict[str, Any], calibration: CalibrationSet,
                 calib_source: str | None = None) -> CalibrationSet | None:
    """The ``--search-data`` windows that rank the candidates, or ``None`` (no ``--search-data``: the
    calibration set's last quarter ranks them, :func:`split_windows`).

    Read by the calibration loader itself (:func:`minillm.calibration.data.calibration_set`: the same
    file types and dataset names as ``--calib``, the same bound on how much of a huge corpus is read),
    ``--search-data-samples`` windows (default: as many as the calibration set) of the calibration
    windows' length, at ``--seed``'s random offsets. Why sampled, not the text's first windows: like
    calibration windows they spread over the whole text, where the first 128 windows of 128 tokens are
    only the opening 23 % of wiki.valid (71 k tokens with SmolLM2's tokenizer), its first articles; a
    ranking whose plans differ by 0.01 nats needs the text's breadth. Offsets may overlap, as calibration
    windows may. ``calib_source``: the ``--calib`` text, which
    is refused here (its windows at the same seed are the calibration windows themselves)."""
    source = run["search_data"]
    if source is None or not run["search"]:
        return None
    if calib_source is not None and _same_text(source, calib_source):
        raise UsageError(f"--search-data {source!r} is the --calib text: the ranking text must be held out; "
                         "give another text (e.g. a validation split) or drop --search-data")
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to read --search-data; pass tokenizer=…")
    from minillm.calibration.data import calibration_set

    n = run["search_data_samples"] or int(calibration.input_ids.shape[0])
    return calibration_set(tokenizer, source, n, int(calibration.input_ids.shape[1]), run["seed"],
                           calibration.batch_size, what=f"--search-data {source!r}")


def _same_text(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_search_data(search_on: bool, architecture: str | None, search_data: str | None,
                      search_data_samples: int | None) -> None:
    """``--search-data`` (and its ``-samples``) only with ``--search``, in one line. Allowed beside
    ``--architecture`` too: an export's recipe records the ranking text with the architecture the search
    chose (a replay does not read it)."""
    if search_data_samples is not None and search_data is None:
        raise UsageError("--search-data-samples sets how many windows of --search-data rank the candidates: "
                         "add --search-data or drop --search-data-samples")
    if search_data is not None and not (search_on or architecture):
        raise UsageError("--search-data ranks the candidates of --search: add --search or drop --search-data")
