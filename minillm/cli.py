"""The ``minillm`` command: thin typer commands that parse options and call one API function each."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from minillm.commands.recipe import with_recipe_options
from minillm.defaults import DEFAULT_CRITERION
from minillm.error_boundary import error_boundary, guard_commands, show_tracebacks

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Structured pruning of causal LMs, in little memory.",
    pretty_exceptions_show_locals=False,  # locals once printed the Hub token
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
#: every command runs inside the one error boundary (kept under its old name for command modules)
friendly_errors = error_boundary


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the full traceback of an error."),
) -> None:
    """Structured pruning of causal LMs, in little memory."""
    show_tracebacks(verbose)


@contextmanager
def progress_bars(verbosity: int = 1) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(task, done, total)`` callback.

    Rich bars on a terminal, one plain line per update in logs.
    """
    from minillm.progress import progress_reporter

    with progress_reporter(console, verbosity) as reporter:
        yield reporter


def _widths_rows(widths: list[dict[str, int]]) -> list[tuple[str, int, int, int]]:
    """Consecutive layers with equal widths collapse into one row (``3-28``)."""
    rows: list[tuple[str, int, int, int]] = []
    start = 0
    for i in range(1, len(widths) + 1):
        key = lambda w: (w["heads"], w["kv_heads"], w["channels"])
        if i == len(widths) or key(widths[i]) != key(widths[start]):
            first, last = widths[start]["layer"], widths[i - 1]["layer"]
            label = str(first) if first == last else f"{first}-{last}"
            rows.append((label, *key(widths[start])))
            start = i
    return rows


def print_prune_summary(result: Any) -> None:
    from minillm.memory import human_bytes
    from minillm.surgery import pruned_widths

    plan = result.plan
    table = Table(title="minillm prune", show_header=False)
    table.add_row("parameters", f"{plan.params_before:,} → {plan.params_after:,}")
    table.add_row("ratio", f"target {plan.target_ratio:.2%}, achieved {plan.achieved_ratio:.2%}")
    if plan.hidden is not None:
        table.add_row("hidden size", f"{len(plan.hidden)} channels kept")
    if plan.kept_layers is not None:
        removed = sorted({p.index for p in plan.layers} - set(plan.kept_layers))
        table.add_row("layers", f"{len(plan.kept_layers)} kept; removed {', '.join(map(str, removed))}")
    table.add_row("criterion", f"{result.plan.extra.get('criterion')} "
                  f"({result.score.forward_passes} forward, {result.score.backward_passes} backward passes)")
    if plan.extra.get("uniform_note"):
        table.add_row("widths", plan.extra["uniform_note"])
    table.add_row("scoring time", f"{result.scoring.seconds:.1f} s")
    table.add_row("total time", f"{result.total_seconds:.1f} s")
    table.add_row("peak memory", f"RSS {human_bytes(result.scoring.peak_rss_bytes)}, "
                  f"CUDA {human_bytes(result.scoring.cuda_peak_bytes)}")
    if result.out is not None:
        table.add_row("saved to", str(result.out))
    console.print(table)
    widths = Table(title="per-layer widths")
    for column in ("layers", "heads", "kv heads", "MLP channels"):
        widths.add_column(column, justify="right")
    for row in _widths_rows(pruned_widths(plan)):
        widths.add_row(*map(str, row))
    console.print(widths)
    if plan.extra.get("search"):
        print_search_table(plan.extra["search"])


def print_search_table(record: dict[str, Any]) -> None:
    """The candidates of ``--search``, best first (unranked ones last, without a loss)."""
    title = (f"architecture search: {record['ranked']} of {record['enumerated']} candidates ranked by "
             f"held-out loss ({record['held_out']}; compensated on "
             f"{record.get('fit', 'the first ' + str(record['fit_windows']))}) "
             f"in {record['seconds']:.0f} s")
    table = Table(title=title)
    for column in ("rank", "layers", "heads/kv", "hidden", "MLP", "parameters", "ratio", "held-out loss"):
        table.add_column(column, justify="right")
    for row in record["candidates"]:
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        table.add_row("-" if row["rank"] is None else str(row["rank"]), str(row["layers"]),
                      f"{row['heads']}/{row['kv_heads']}", str(row["hidden"]), str(row["mlp"]),
                      f"{row['params']:,}", f"{row['ratio']:.2%}", loss)
    console.print(table)


#: prune options about the invocation, not the run: everything else is a recipe field.
INVOCATION_OPTIONS = ("recipe", "verbose", "quiet")


def command_line_values(ctx: typer.Context) -> dict[str, Any]:
    """Options given on the command line (or through the environment): they override the recipe."""
    given = ("COMMANDLINE", "ENVIRONMENT")  # compared by name: typer ships its own ParameterSource enum
    return {name: value for name, value in ctx.params.items()
            if name not in INVOCATION_OPTIONS
            and getattr(ctx.get_parameter_source(name), "name", "") in given}


def check_prune_options(settings: Any, recipe: str | None) -> None:
    """Everything about a prune run that can be refused before the model is loaded."""
    from minillm.output_guard import check_output_dir, check_output_file

    inputs = (settings.model, settings.calib, settings.search_data, recipe)
    if settings.dry_run and settings.report:
        from minillm.errors import UsageError

        raise UsageError("--dry-run writes nothing, --report writes files: drop one of them")
    if settings.out is not None and not settings.dry_run:
        check_output_dir(settings.out, settings.overwrite, settings.force, inputs)
    check_output_file(settings.report, settings.overwrite or settings.force, "--report", inputs,
                      create_folder=True)


@app.command()
@friendly_errors
@with_recipe_options()
def prune(
    ctx: typer.Context,
    recipe: str = typer.Option(None, "--recipe", "-r",
                               help="Recipe (.yaml/.json, or an export's minillm.json); "
                               "flags given here override it."),
    *,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Library logs and download bars too."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or tables: one result line."),
    **settings: Any,  # one option per Recipe field (minillm.recipe): flag, default and help declared there
) -> None:
    """Score every attention head and MLP channel, remove the least important, export the smaller model."""
    from minillm.api import prune as prune_api
    from minillm.progress import configure_logging, timings_line
    from minillm.recipe import Recipe

    settings = Recipe.resolve(recipe, command_line_values(ctx))
    check_prune_options(settings, recipe)
    verbosity = 1 + int(verbose) - int(quiet)
    configure_logging(verbosity, console.is_terminal)
    with progress_bars(verbosity) as progress:
        result = prune_api(settings.model, settings, out=settings.out, overwrite=settings.overwrite,
                           report=settings.report, offload_dir=settings.offload_dir,
                           force=settings.force, trust_remote_code=settings.trust_remote_code,
                           inputs=(recipe,), progress=progress,
                           command=shlex.join(["minillm", *sys.argv[1:]]))
    if settings.dry_run:
        typer.echo(result.plan.to_json())
    if verbosity > 0:
        print_prune_summary(result)
        total = max(result.total_seconds, result.timeline.samples[-1].seconds)
        console.print(timings_line(result.timeline.stage_seconds(), progress.step_seconds(), total),
                      highlight=False, soft_wrap=True)
        if settings.report:
            console.print(f"report: {settings.report}", highlight=False)
    else:
        saved = f"; saved to {result.out}" if result.out is not None else ""
        if result.plan.extra.get("search"):
            saved = f"; searched: {result.plan.extra['architecture']}{saved}"
        console.print(f"pruned {result.plan.params_before:,} → {result.plan.params_after:,} parameters "
                      f"({result.plan.achieved_ratio:.2%}) in {result.total_seconds:.1f} s{saved}",
                      highlight=False)


@app.command("criteria")
def list_criteria() -> None:
    """List the scoring criteria and what each measures (every one runs on offloaded models too)."""
    from minillm.scoring import CRITERIA

    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("criterion", "what it scores"):
        table.add_column(column)
    for name in CRITERIA.names():
        label = f"{name} (default)" if name == DEFAULT_CRITERION else name
        table.add_row(label, CRITERIA.summary(name))
    Console(soft_wrap=True).print(table)


#: Command modules that each expose ``register(app)``; one line per command family.
COMMAND_MODULES = (
    "minillm.commands.evaluate",
    "minillm.commands.example",
    "minillm.commands.compare",
    "minillm.commands.recover",
    "minillm.commands.push",
    "minillm.commands.inspect",
    "minillm.commands.bench",
)
#: Secondary pruners (CNN, LSTM) bring their own typer sub-apps.
SUBAPPS = (
    ("cnn", "minillm.vision.cli", "CNN channel pruning (IFSO and baselines)."),
    ("lstm", "minillm.lstm.cli", "LSTM hidden-unit pruning and dynamic sparse training."),
)


def _optional_module(name: str) -> Any:
    """Import a command module, or ``None`` if it does not exist (yet) in this installation."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not exc.name or not name.startswith(exc.name):
            raise
        return None


_registered = False


def register_commands() -> None:
    """Attach every available command module and sub-app to ``app`` (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in COMMAND_MODULES:
        module = _optional_module(name)
        if module is not None:
            module.register(app)
    for name, module_name, help_text in SUBAPPS:
        module = _optional_module(module_name)
        if module is not None:
            module.app.pretty_exceptions_show_locals = False
            app.add_typer(module.app, name=name, help=help_text)
    guard_commands(app)


def main() -> None:
    register_commands()
    app()
