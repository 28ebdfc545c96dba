"""``minillm eval``: perplexity and lm-eval zero-shot tasks of a model or an export, optionally side by side
with a reference model (``--compare-to dense/``) as retained fractions."""

from __future__ import annotations

import math
import shlex
import sys

import typer
from rich.table import Table

from minillm.cli import console, friendly_errors, progress_bars
from minillm.commands import options


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if key == "perplexity" else f"{value:.4f}"


def _limit(value: float | None) -> int | float | None:
    return int(value) if value is not None and value >= 1 and float(value).is_integer() else value


@friendly_errors
def evaluate(
    model: str = options.model_argument(),
    ppl: str = typer.Option(None, help="Perplexity text: .txt/.jsonl/.json file or dataset name."),
    tasks: str = typer.Option(
        None,
        help="lm-eval tasks, comma-separated: boolq,piqa,hellaswag,winogrande,"
        "arc_easy,arc_challenge,openbookqa.",
    ),
    tasks_dir: str = typer.Option(
        None, help="Folder of your own lm-eval task YAMLs (lm-eval's include_path)."
    ),
    data_dir: str = typer.Option(
        None,
        help="Folder of local task files (piqa.validation.jsonl, …): runs "
        "minillm's shipped task YAMLs with no network.",
    ),
    num_fewshot: int = typer.Option(0, help="Few-shot examples per task prompt."),
    limit: float = typer.Option(None, help="Examples per task (a fraction if < 1); state it when reporting."),
    compare_to: str = typer.Option(None, help="Reference model (e.g. the dense one) evaluated the same way."),
    seq_len: int = typer.Option(128, help="Tokens per perplexity window."),
    ppl_bos: str = typer.Option(
        "stream", metavar="[stream|window]",
        help="Perplexity's BOS: one at the start of the text (stream: the pruning papers' protocol) or one "
        "in front of every window (window: lm-eval's convention; Gemma needs it).",
    ),
    batch_size: int = typer.Option(8, help="Windows / lm-eval requests per forward pass."),
    seed: int = typer.Option(0, help="Seed for lm-eval's sampling (few-shot examples)."),
    device_map: str = options.device_map(),
    dtype: str = options.dtype(),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON here."),
    overwrite: bool = options.overwrite_file(),
    trust_remote_code: bool = options.trust_remote_code(),
) -> None:
    """Measure perplexity (non-overlapping windows) and zero-shot accuracy (lm-eval) of a model."""
    import json
    from pathlib import Path
    from typing import get_args

    from minillm.evaluate.perplexity import PplBos
    from minillm.evaluate.suite import evaluate_model, retained
    from minillm.loading import check_remote_code
    from minillm.option_checks import check_choice, check_loading, check_positive, check_seq_len
    from minillm.output_guard import check_output_file

    check_seq_len(seq_len, None)
    check_choice(ppl_bos, get_args(PplBos), "--ppl-bos")
    check_positive(batch_size, "--batch-size")
    check_loading(device_map, seed=seed)
    check_output_file(json_out, overwrite, "--json", inputs=(model, compare_to, ppl))
    for source in (model, compare_to):  # both, before the first evaluation starts
        if source:
            check_remote_code(source, trust_remote_code)

    options = dict(
        ppl=ppl,
        seq_len=seq_len,
        ppl_bos=ppl_bos,
        tasks=tasks,
        tasks_dir=tasks_dir,
        data_dir=data_dir,
        num_fewshot=num_fewshot,
        limit=_limit(limit),
        batch_size=batch_size,
        device_map=device_map,
        dtype=dtype,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    with progress_bars() as progress:
        report = evaluate_model(model, progress=progress, **options)
        reference = evaluate_model(compare_to, progress=progress, **options) if compare_to else None
    for name, result in (("", report), (f" (reference {compare_to})", reference)):
        if result is not None and result.zeroshot is not None:
            typer.echo(f"lm-eval{name}:\n{result.zeroshot.table}")
    mine = report.metrics()
    ref = reference.metrics() if reference else {}
    kept = retained(report, reference) if reference else {}
    table = Table(title=f"minillm eval {model}")
    table.add_column("metric")
    table.add_column(model, justify="right")
    if reference:
        table.add_column(compare_to, justify="right")
        table.add_column("retained", justify="right")
    for key, value in mine.items():
        row = [key, _fmt(key, value)]
        if reference:
            row += [_fmt(key, ref.get(key)), f"{kept[key]:.1%}" if key in kept else "-"]
        table.add_row(*row)
    console.print(table)
    if report.perplexity is not None:
        result = report.perplexity
        typer.echo(f"perplexity {result.perplexity:.4f} ({result.windows} windows x {result.seq_len} tokens)")
    if report.zeroshot is not None:
        typer.echo(
            f"zero-shot mean {report.zeroshot.mean:.4f} over {len(report.zeroshot.scores)} tasks"
            + (f" (retained {kept['mean']:.1%} of {compare_to})" if "mean" in kept else "")
        )
    if json_out:
        payload = {
            **report.to_dict(),
            "options": {k: v for k, v in options.items() if k not in ("device_map", "trust_remote_code")},
            "command": shlex.join(["minillm", *sys.argv[1:]]),
        }
        if reference is not None:
            payload["reference"] = reference.to_dict()
            payload["retained"] = kept
        Path(json_out).write_text(json.dumps(payload, indent=1, default=str))


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
