"""``minillm cnn train|prune|eval``: CNN channel pruning with IFSO and the classic baselines.

Thin commands: parse, call one function of :mod:`minillm.vision.api`, print a rich table. Torch and the
pruning code import inside the commands so ``minillm --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__,
                  pretty_exceptions_show_locals=False)
console = Console()
err = Console(stderr=True)

_CRITERIA = "ifso, l1, bn-scale, taylor, random"


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


def _progress_bar(description: str) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task(description, total=None, info="")

    def update(step: int, total: int, info: dict[str, float]) -> None:
        bar.update(
            task, completed=step, total=total, info=f"epoch {info['epoch']:.0f} loss {info['loss']:.4f}"
        )

    return bar, update


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _summary(rows: list[tuple[str, dict[str, float]]], dense: dict[str, float] | None = None) -> Table:
    table = Table(title="Summary")
    for col in ("model", "params", "FLOPs", "FLOPs removed", "accuracy", "loss"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, m in rows:
        removed = f"{1 - m['flops'] / dense['flops']:.1%}" if dense else "-"
        table.add_row(
            name,
            _fmt_count(m["params"]),
            _fmt_count(m["flops"]),
            removed,
            f"{m['accuracy']:.2%}",
            f"{m['loss']:.4f}",
        )
    return table


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the export to (safetensors + JSON)."),
    arch: str = typer.Option("resnet20", help="resnet20, resnet32, resnet56, vgg11 or vgg16."),
    data: str = typer.Option("mnist5k", help="mnist5k[:PATH], digits, cifar10:DIR or folder:DIR."),
    epochs: int = typer.Option(10, min=1, help="Training epochs."),
    lr: float = typer.Option(0.1, help="Peak learning rate (cosine schedule)."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay λ (IFSO uses it as H_ww ≈ λI)."),
    batch_size: int = typer.Option(128, min=1),
    slim_l1: float = typer.Option(0.0, help="Network-slimming L1 penalty on BN scales (for bn-scale)."),
    image_size: int = typer.Option(None, help="Pad/resize images to this size (default: 28 MNIST, 32 VGG)."),
    seed: int = typer.Option(0, help="Seed for init, shuffling and augmentation."),
) -> None:
    """Train a CIFAR-style ResNet/VGG from scratch and export it."""
    from minillm.vision.api import train_cnn
    from minillm.vision.models import ARCH_NAMES
    from minillm.vision.train import TrainConfig

    if arch not in ARCH_NAMES:
        raise typer.BadParameter(
            f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}", param_hint="--arch"
        )
    try:
        cfg = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, slim_l1=slim_l1, seed=seed
        )
        bar, update = _progress_bar(f"train {arch}")
        with bar:
            result = train_cnn(arch, data, out, cfg, image_size, progress=update)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        raise _fail(str(exc)) from None
    console.print(result["data"])
    console.print(_summary([(arch, result["metrics"])]))
    console.print(f"saved to {out}")


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Export folder written by `minillm cnn train` (or prune)."),
    criterion: str = typer.Option("ifso", help=f"Channel criterion: {_CRITERIA}."),
    flops_ratio: float = typer.Option(None, "--flops-ratio", help="Fraction of FLOPs to remove, e.g. 0.5."),
    ratio: float = typer.Option(None, "--ratio", help="Fraction of parameters to remove (instead of FLOPs)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the pruned export."),
    data: str = typer.Option(None, help="Data set (default: the one recorded in the export)."),
    finetune_epochs: int = typer.Option(0, min=0, help="Fine-tuning epochs after pruning."),
    finetune_lr: float = typer.Option(0.01, help="Peak learning rate for fine-tuning."),
    calib_batches: int = typer.Option(8, min=1, help="Calibration batches for data-driven criteria."),
    calib_batch_size: int = typer.Option(64, min=1),
    cost_norm: str = typer.Option(
        "none", help="'none' or 'sqrt-flops' (divide scores by sqrt of FLOPs saved)."
    ),
    allocation: str = typer.Option(
        "global", help="'global' (one ranking over all layers) or 'uniform' (same fraction per layer)."
    ),
    max_group_ratio: float = typer.Option(0.9, help="Most a single channel group may lose."),
    hvp: str = typer.Option("fd", help="IFSO Hessian-vector products: 'fd' (finite differences) or 'exact'."),
    include_hmm: bool = typer.Option(False, help="IFSO: keep the H_mm term of the quadratic form."),
    weight_decay: float = typer.Option(None, help="IFSO's λ (default: the one the model was trained with)."),
    bn_recalib: int = typer.Option(
        0, min=0, help="Re-estimate BN statistics on this many training images after the cut."
    ),
    seed: int = typer.Option(0, help="Seed for calibration sampling and the random criterion."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
) -> None:
    """Score channels, remove the lowest globally to a FLOPs or parameter target, fine-tune, export."""
    from minillm.registry import UnknownNameError
    from minillm.vision.api import PruneSettings, prune_cnn
    from minillm.vision.criteria import CRITERIA

    try:
        CRITERIA.get(criterion)
    except UnknownNameError as exc:
        raise typer.BadParameter(str(exc), param_hint="--criterion") from None
    if (flops_ratio is None) == (ratio is None):
        raise typer.BadParameter("give exactly one of --flops-ratio or --ratio")
    if out is None and not dry_run:
        raise typer.BadParameter("--out is required unless --dry-run", param_hint="--out")
    if cost_norm not in ("none", "sqrt-flops"):
        raise typer.BadParameter("must be 'none' or 'sqrt-flops'", param_hint="--cost-norm")
    if allocation not in ("global", "uniform"):
        raise typer.BadParameter("must be 'global' or 'uniform'", param_hint="--allocation")
    options: dict[str, Any] = {}
    if criterion == "ifso":
        if hvp not in ("fd", "exact"):
            raise typer.BadParameter("must be 'fd' or 'exact'", param_hint="--hvp")
        options = {"hvp": hvp, "include_hmm": include_hmm}
    settings = PruneSettings(
        criterion=criterion,
        flops_ratio=flops_ratio,
        params_ratio=ratio,
        calib_batches=calib_batches,
        calib_batch_size=calib_batch_size,
        seed=seed,
        weight_decay=weight_decay,
        cost_norm=cost_norm,
        allocation=allocation,
        max_group_ratio=max_group_ratio,
        bn_recalib_images=bn_recalib,
        criterion_options=options,
    )
    try:
        bar, update = _progress_bar("fine-tune")
        with bar:
            result = prune_cnn(model, settings, out, data, finetune_epochs, finetune_lr, dry_run, update)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        raise _fail(str(exc)) from None
    plan = result["plan"]
    if dry_run:
        table = Table(
            title=f"Prune plan ({criterion}, {plan.achieved_ratio:.1%} of {plan.target_kind} removed)"
        )
        for col in ("group", "kept", "of"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for name, kept, total in plan.summary_rows():
            table.add_row(name, str(kept), str(total))
        console.print(table)
        return
    rows = [("dense", result["before"]), (f"pruned ({criterion})", result["after"])]
    if "after_bn" in result:
        rows.append(("+ BN recalibration", result["after_bn"]))
    if "finetuned" in result:
        rows.append((f"+ fine-tune {finetune_epochs} ep", result["finetuned"]))
    console.print(_summary(rows, result["before"]))
    console.print(f"scoring took {result['score_seconds']:.1f}s; saved to {out}")


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Export folder."),
    data: str = typer.Option(None, help="Data set (default: the one recorded in the export)."),
) -> None:
    """Accuracy, parameters and FLOPs of an export on its test split."""
    from minillm.vision.api import evaluate_cnn

    try:
        result = evaluate_cnn(model, data)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise _fail(str(exc)) from None
    console.print(result["data"])
    console.print(_summary([(str(model), result["metrics"])]))
