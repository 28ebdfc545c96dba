"""``minillm lstm train|prune|eval``: parse options, call :mod:`minillm.lstm.api`, print tables.

Heavy imports (torch, the API) happen inside the commands so ``minillm --help`` stays fast. Bad input
ends with a one-line ``error: …`` and exit code 2; a model folder is only ever written complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()
err_console = Console(stderr=True)

DataOpt = typer.Option(..., "--data", help="Folder with *train.txt, *valid.txt, *test.txt (PTB format).")


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Turn expected failures into one line on stderr and a non-zero exit."""
    from minillm.lstm.data import CorpusError
    from minillm.lstm.export import ModelFileError
    from minillm.registry import UnknownNameError

    try:
        yield
    except (CorpusError, ModelFileError, UnknownNameError, FileExistsError, ValueError,
            NotImplementedError, FloatingPointError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display; each API phase name becomes one bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=False) as bar:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


@app.command()
def train(
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", help="Folder to write the trained model to."),
    embed: int = typer.Option(200, help="Embedding width."),
    hidden: int = typer.Option(200, help="Hidden units per LSTM layer."),
    layers: int = typer.Option(2, help="Number of LSTM layers."),
    dropout: float = typer.Option(0.2, help="Dropout (embedding, between layers, before decoder)."),
    tie: bool = typer.Option(False, "--tie/--no-tie", help="Tie decoder and embedding (hidden == embed)."),
    epochs: int = typer.Option(2, help="Passes over the training split."),
    max_steps: int = typer.Option(0, help="Stop after this many steps (0 = all epochs)."),
    lr: float = typer.Option(2e-3, help="Peak Adam learning rate (cosine decay)."),
    batch_size: int = typer.Option(32, help="Parallel token streams."),
    bptt: int = typer.Option(35, help="Truncated-BPTT length."),
    seed: int = typer.Option(0, help="Seed of initialisation and dropout."),
    dst: bool = typer.Option(False, "--dst", help="Dynamic sparse training (masked Linear + LSTM layers)."),
    dst_alpha: float = typer.Option(1e-4, help="DST regulariser weight α in α·Σexp(−t)."),
    group_lasso: float = typer.Option(0.0, help="Train with λ·Σ‖unit group‖₂ (structure for pruning)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Train a word-level LSTM language model (dense, DST or group-lasso regularised)."""
    with _cli_errors():
        from minillm.lstm import api
        from minillm.lstm.train import TrainConfig

        config = TrainConfig(epochs=epochs, max_steps=max_steps or None, lr=lr, batch_size=batch_size,
                             bptt=bptt, seed=seed)
        model_config = {"embed_size": embed, "hidden_sizes": (hidden,) * layers, "dropout": dropout,
                        "tie_weights": tie}
        settings = api.DstSettings(alpha=dst_alpha) if dst else None
        with _progress() as progress:
            result = api.train(data, out, model_config, config, dst=settings, group_lasso=group_lasso,
                               overwrite=overwrite, progress=progress)
    console.print(_table("LSTM LM trained", [
        ("hidden sizes", str(list(result.config.hidden_sizes))),
        ("parameters", f"{result.parameters:,}"),
        ("steps", f"{result.steps:,}"),
        ("train time (s)", _fmt(result.seconds, 1)),
        ("valid perplexity", _fmt(result.valid_ppl)),
        ("test perplexity", _fmt(result.test_ppl)),
        *([("DST weight density", _fmt(result.dst_density, 4))] if result.dst_density is not None else []),
        ("saved to", str(out)),
    ]))
    if result.dst_layers:
        table = Table(title="DST sparsity learned per layer", title_justify="left")
        for column in ("layer", "shape", "density", "empty rows", "mean t", "per gate (i f g o)"):
            table.add_column(column, justify="left" if column in ("layer", "shape") else "right")
        for row in result.dst_layers:
            gates = " ".join(f"{v:.2f}" for v in row["per_gate"].values()) or "—"
            table.add_row(row["name"], "×".join(map(str, row["shape"])), f"{row['density']:.3f}",
                          str(row["empty_rows"]), f"{row['threshold_mean']:.4f}", gates)
        console.print(table)


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Folder of a saved LSTM LM (from `minillm lstm train`)."),
    data: Path = DataOpt,
    out: Path = typer.Option(None, "--out", help="Folder to write the pruned model to."),
    criterion: str = typer.Option("magnitude", help="magnitude | group_lasso | activation | fms | random."),
    keep: float = typer.Option(0.5, help="Fraction of hidden units kept in every layer, in (0, 1]."),
    calib_windows: int = typer.Option(8, help="Calibration BPTT windows (from train) for data criteria."),
    spsa_steps: int = typer.Option(32, help="SPSA perturbations for fms (two forward passes each)."),
    spsa_eps: float = typer.Option(1e-3, help="SPSA perturbation size."),
    group_lasso: float = typer.Option(
        5e-3, help="λ of the group-lasso phase; start near the typical per-unit gradient norm."
    ),
    group_lasso_steps: int = typer.Option(
        200, help="Regularised steps before scoring (0 = the model was trained with the penalty)."
    ),
    finetune_steps: int = typer.Option(200, help="Fine-tuning steps after pruning (0 = none)."),
    lr: float = typer.Option(1e-3, help="Fine-tuning peak learning rate."),
    batch_size: int = typer.Option(32, help="Fine-tuning batch size."),
    seed: int = typer.Option(0, help="Seed of SPSA, random scores and fine-tuning dropout."),
    speed: bool = typer.Option(False, help="Also time inference before and after."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the prune plan; write nothing."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Remove LSTM hidden units (all four gates, recurrent and next-layer columns), fine-tune, save."""
    with _cli_errors():
        if out is None and not dry_run:
            raise ValueError("pass --out FOLDER (or --dry-run to only print the plan)")
        from minillm.calibration.spsa import SpsaConfig
        from minillm.lstm import api
        from minillm.lstm.criteria import CRITERIA
        from minillm.lstm.train import TrainConfig

        CRITERIA.get(criterion)  # fail fast with a did-you-mean message
        finetune = (TrainConfig(epochs=1, max_steps=finetune_steps, lr=lr, batch_size=batch_size, seed=seed)
                    if finetune_steps > 0 else None)
        settings = api.PruneSettings(
            criterion=criterion, keep_ratio=keep, calib_windows=calib_windows,
            spsa=SpsaConfig(steps=spsa_steps, eps=spsa_eps, seed=seed), group_lasso=group_lasso,
            group_lasso_steps=group_lasso_steps if criterion == "group_lasso" else 0,
            finetune=finetune, seed=seed,
        )
        with _progress() as progress:
            result = api.prune(model, data, out, settings, dry_run=dry_run, speed=speed,
                               overwrite=overwrite, progress=progress)
    plan = result.plan
    table = Table(title=f"Prune plan ({criterion}, keep {keep:.0%})", title_justify="left")
    for column in ("layer", "hidden before", "hidden after"):
        table.add_column(column, justify="right")
    for layer, (before, after) in enumerate(zip(plan.original_sizes, plan.kept_sizes, strict=True)):
        table.add_row(str(layer), str(before), str(after))
    console.print(table)
    rows = [
        ("parameters", f"{result.parameters_before:,} → {result.parameters_after:,}"),
        ("fused LSTM check max |Δ|", f"{result.fused_max_error:.1e}"),
    ]
    if not dry_run:
        rows += [
            ("valid ppl before", _fmt(result.valid_ppl_before)),
            ("valid ppl pruned", _fmt(result.valid_ppl_pruned)),
            ("valid ppl fine-tuned", _fmt(result.valid_ppl_finetuned)),
            ("test ppl", _fmt(result.test_ppl)),
        ]
    before, after = result.speed_before, result.speed_after
    if before is not None and after is not None:
        rows.append(("LM forward ms (B=1, T=35)", f"{before.lm_ms:.2f} → {after.lm_ms:.2f}"))
        rows.append(("LSTM forward ms", f"{before.lstm_ms:.2f} → {after.lstm_ms:.2f}"))
    rows.append(("saved to", "— (dry run)" if dry_run else str(out)))
    console.print(_table("Pruning summary", rows))


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Folder of a saved LSTM LM."),
    data: Path = DataOpt,
    split: str = typer.Option("test", help="train | valid | test."),
    batch_size: int = typer.Option(10, help="Evaluation batch size."),
    bptt: int = typer.Option(35, help="Evaluation window length."),
    speed: bool = typer.Option(False, help="Also time inference (batch 1, 35 tokens)."),
) -> None:
    """Perplexity of a saved LSTM LM on one split (and optionally its inference speed)."""
    with _cli_errors():
        from minillm.lstm import api

        with _progress() as progress:
            result = api.evaluate(model, data, split, batch_size=batch_size, bptt=bptt, speed=speed,
                                  progress=progress)
    rows = [
        ("hidden sizes", str(list(result.config.hidden_sizes))),
        ("parameters", f"{result.parameters:,}"),
        (f"{result.split} tokens", f"{result.tokens:,}"),
        (f"{result.split} perplexity", _fmt(result.ppl)),
    ]
    if result.speed is not None:
        rows += [("LM forward ms (B=1, T=35)", f"{result.speed.lm_ms:.2f}"),
                 ("LSTM forward ms", f"{result.speed.lstm_ms:.2f}")]
    console.print(_table("Evaluation", rows))
