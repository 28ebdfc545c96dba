"""``minillm compare``: every criterion side by side on one model (calls :func:`minillm.compare.compare`)."""

from __future__ import annotations

from typing import Any

import typer

from minillm.cli import console, friendly_errors, progress_bars
from minillm.commands import options
from minillm.commands.recipe import with_recipe_options
from minillm.defaults import DEFAULT_COMPENSATION
from minillm.errors import UsageError

DEFAULT_METHODS = "fms,taylor-gate,taylor-lowmem,taylor,flap,wanda-sp,magnitude,random"


def _floats(spec: str, option: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(
            f"{option} takes comma-separated numbers, e.g. {option} 0.1,0.2,0.3 (got {spec!r})"
        ) from None


#: Recipe fields ``compare`` does not take from the Recipe's declaration: its matrix axes (``--methods``,
#: ``--ratio``, ``--allocation`` and ``--compensation`` as lists), its own outputs (``--out`` is the
#: folder of the tables, ``--report`` and ``--overwrite`` are about those files) and what only an export
#: needs.
NOT_SHARED = ("criterion", "ratio", "allocation", "compensation", "out", "report", "overwrite", "force",
              "dry_run", "max_shard_size", "streaming", "offload_dir", "max_memory")


@friendly_errors
@with_recipe_options(exclude=NOT_SHARED)
def compare_command(
    ctx: typer.Context,
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe (.yaml/.json, or an export's "
                               "minillm.json) for the settings every cell shares; flags given here override "
                               "it."),
    methods: str = typer.Option(DEFAULT_METHODS, help="Comma-separated criteria (see `minillm criteria`)."),
    ratio: str = typer.Option("0.2", help="Ratio(s) of parameters to remove, comma-separated: 0.1,0.2,0.3."),
    allocation: str = typer.Option("uniform,global", help="Comma list of uniform, global, log, error."),
    compensation: str = typer.Option(
        DEFAULT_COMPENSATION, "--compensation", "--compensations",
        help="Comma list of none, bias, refit: each is a row (the cut compensated block by block)."),
    eval_ppl: str = typer.Option(None, help="Perplexity text (file or dataset name)."),
    eval_windows: int = typer.Option(None, help="Only the first N perplexity windows (faster; say so)."),
    tasks: str = typer.Option(None, help="lm-eval tasks, comma-separated (zero-shot accuracy)."),
    tasks_dir: str = typer.Option(None, help="Folder of extra lm-eval task YAMLs."),
    data_dir: str = typer.Option(None, help="Folder of local task data (offline runs)."),
    limit: float = typer.Option(None, help="lm-eval examples per task."),
    out: str = typer.Option("compare-out", "--out", "-o", help="Folder for compare.md / .csv / .png."),
    report: str = typer.Option(None, help="Also write an HTML report (plots as PNGs beside it), e.g. "
                               "compare.html — the same look as prune's --report."),
    overwrite: bool = options.overwrite_file(),
    **settings: Any,  # the options every cell shares: one per Recipe field (minillm.recipe)
) -> None:
    """Prune with each method (scored once, in a fresh process each) and tabulate quality and cost."""
    from minillm.cli import command_line_values
    from minillm.compare import compare
    from minillm.compare.report import markdown_table, render_compare_report
    from minillm.recipe import Recipe

    given = {k: v for k, v in command_line_values(ctx).items() if k in settings}  # they override --recipe
    base = (Recipe.load(recipe) if recipe else Recipe()).merged(given)
    if base.model is None:
        raise UsageError("no model to compare: pass --model (hub id, folder or .gguf) or set `model:` in the "
                         "recipe")
    if report is not None:
        from minillm.output_guard import check_output_file
        from minillm.report import require_matplotlib

        check_output_file(report, overwrite, "--report", inputs=(base.model, base.calib, eval_ppl, recipe),
                          create_folder=True)
        require_matplotlib()  # fail before the work, not after it

    with progress_bars() as progress:
        result = compare(
            base.model,
            base,
            methods=methods.split(","),
            ratios=_floats(ratio, "--ratio"),
            allocations=[a.strip() for a in allocation.split(",") if a.strip()],
            compensation=compensation,
            eval_ppl=eval_ppl,
            eval_windows=eval_windows,
            tasks=tasks,
            tasks_dir=tasks_dir,
            data_dir=data_dir,
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            out_dir=out,
            progress=progress,
        )
    typer.echo(markdown_table(result))
    files = [*result.files, *(render_compare_report(result, report) if report is not None else [])]
    console.print("wrote " + ", ".join(str(f) for f in files))


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
