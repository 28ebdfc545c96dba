"""What ``minillm eval`` does, as one API call: perplexity and/or lm-eval tasks on one model, and the
side-by-side comparison with a reference (usually the dense model) as retained fractions.

The JSON written by the CLI is :meth:`EvalReport.to_dict` (plus ``reference`` and ``retained`` with
``--compare-to``); ``minillm push`` reads the same JSON into the model card.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from minillm.errors import UsageError
from minillm.evaluate.perplexity import PerplexityResult, PplBos
from minillm.evaluate.zeroshot import ZeroShotResult

Progress = Callable[[str, int, int], None]


@dataclass
class EvalReport:
    model: str
    params: int
    perplexity: PerplexityResult | None = None
    ppl_source: str | None = None
    zeroshot: ZeroShotResult | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "params": self.params}
        if self.perplexity is not None:
            out["perplexity"] = {
                **asdict(self.perplexity),
                "source": self.ppl_source,
                "protocol": self.perplexity.protocol,
            }
        if self.zeroshot is not None:
            out["zeroshot"] = self.zeroshot.to_dict()
        return out

    def metrics(self) -> dict[str, float]:
        """Flat ``{name: value}``: perplexity, each task's headline score, and the task mean."""
        values: dict[str, float] = {}
        if self.perplexity is not None:
            values["perplexity"] = self.perplexity.perplexity
        if self.zeroshot is not None:
            values.update({name: s.value for name, s in self.zeroshot.scores.items()})
            values["mean"] = self.zeroshot.mean
        return values


def evaluate_model(
    model: str | nn.Module,
    *,
    tokenizer: Any = None,
    ppl: str | None = None,
    seq_len: int = 128,
    ppl_bos: PplBos = "stream",
    tasks: str | list[str] | None = None,
    tasks_dir: str | None = None,
    data_dir: str | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    device_map: str | dict | None = "auto",
    dtype: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> EvalReport:
    """Perplexity on non-overlapping windows of ``ppl`` and/or zero-shot ``tasks`` through lm-eval."""
    from minillm.groups import count_parameters

    if ppl is None and not tasks:
        raise UsageError(
            "nothing to evaluate: pass --ppl <text file or dataset name> and/or --tasks boolq,piqa,…"
        )
    if (tasks_dir or data_dir) and not tasks:
        raise UsageError(
            "--tasks-dir/--data-dir say where tasks come from; also pass --tasks, e.g. --tasks piqa"
        )
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "in-memory model")
    if isinstance(model, str):
        from minillm.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code)
        model = load_model(model, device_map=device_map, dtype=dtype, trust_remote_code=trust_remote_code,
                           seq_len=seq_len if ppl is not None else None)
    if tokenizer is None:
        raise UsageError("a tokenizer is needed for evaluation; pass tokenizer=…")
    report = EvalReport(model=name, params=count_parameters(model))
    if ppl is not None:
        from minillm.calibration.data import evaluation_windows
        from minillm.evaluate.perplexity import perplexity

        per_window = ppl_bos == "window"
        windows = evaluation_windows(tokenizer, ppl, seq_len, bos_per_window=per_window)
        on_batch = (lambda d, t: progress("perplexity", d, t)) if progress else None
        result = perplexity(model, windows, batch_size, on_batch)
        report.perplexity = replace(result, bos_per_window=per_window)
        report.ppl_source = ppl
    if tasks:
        from minillm.evaluate.zeroshot import evaluate_tasks

        report.zeroshot = evaluate_tasks(
            model,
            tokenizer,
            tasks,
            tasks_dir=tasks_dir,
            data_dir=data_dir,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
        )
    return report


def retained(report: EvalReport, reference: EvalReport) -> dict[str, float]:
    """Score / reference score for every shared metric (for perplexity: reference / perplexity, so that
    1.0 means no loss and smaller means worse on every row)."""
    mine, ref = report.metrics(), reference.metrics()
    out: dict[str, float] = {}
    for key in mine.keys() & ref.keys():
        num, den = (ref[key], mine[key]) if key == "perplexity" else (mine[key], ref[key])
        out[key] = num / den if den else math.nan
    return out
