"""``minillm compare``: every criterion side by side on one model (calls :func:`minillm.compare.compare`)."""

from __future__ import annotations

import typer

from minillm.cli import console, friendly_errors, progress_bars
from minillm.commands import options
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


@friendly_errors
def compare_command(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, local HF folder, or .gguf file."),
    methods: str = typer.Option(DEFAULT_METHODS, help="Comma-separated criteria (see `minillm criteria`)."),
    ratio: str = typer.Option("0.2", help="Ratio(s) of parameters to remove, comma-separated: 0.1,0.2,0.3."),
    allocation: str = typer.Option("uniform,global", help="Comma list of uniform, global, log, error."),
    calib: str = options.calib(),
    calib_samples: int = options.calib_samples(),
    seq_len: int = typer.Option(128, help="Tokens per calibration and perplexity window."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    eval_ppl: str = typer.Option(None, help="Perplexity text (file or dataset name)."),
    eval_windows: int = typer.Option(None, help="Only the first N perplexity windows (faster; say so)."),
    tasks: str = typer.Option(None, help="lm-eval tasks, comma-separated (zero-shot accuracy)."),
    tasks_dir: str = typer.Option(None, help="Folder of extra lm-eval task YAMLs."),
    data_dir: str = typer.Option(None, help="Folder of local task data (offline runs)."),
    limit: float = typer.Option(None, help="lm-eval examples per task."),
    head_mode: str = options.head_mode(),
    structures: str = options.structures(),
    skip_first: int = options.skip_first(),
    skip_last: int = options.skip_last(),
    seed: int = typer.Option(0, help="Seed of calibration sampling and random estimators."),
    spsa_steps: int = typer.Option(16, help="SPSA perturbations (fms, fms-gate) / passes (fwd-grad)."),
    spsa_eps: float = options.spsa_eps(),
    compensation: str = typer.Option(
        DEFAULT_COMPENSATION, "--compensation", "--compensations",
        help="Comma list of none, bias, refit: each is a row (the cut compensated block by block)."),
    damping: float = options.damping(),
    device_map: str = options.device_map(),
    dtype: str = options.dtype(),
    out: str = typer.Option("compare-out", "--out", "-o", help="Folder for compare.md / .csv / .png."),
    report: str = typer.Option(None, help="Also write an HTML report (plots as PNGs beside it), e.g. "
                               "compare.html — the same look as prune's --report."),
    trust_remote_code: bool = options.trust_remote_code(),
    overwrite: bool = options.overwrite_file(),
) -> None:
    """Prune with each method (scored once, in a fresh process each) and tabulate quality and cost."""
    from minillm.compare import compare
    from minillm.compare.report import markdown_table, render_compare_report

    if report is not None:
        from minillm.output_guard import check_output_file
        from minillm.report import require_matplotlib

        check_output_file(report, overwrite, "--report", inputs=(model, calib, eval_ppl), create_folder=True)
        require_matplotlib()  # fail before the work, not after it

    with progress_bars() as progress:
        result = compare(
            model,
            methods=methods.split(","),
            ratios=_floats(ratio, "--ratio"),
            allocations=[a.strip() for a in allocation.split(",") if a.strip()],
            calib=calib,
            calib_samples=calib_samples,
            seq_len=seq_len,
            batch_size=batch_size,
            eval_ppl=eval_ppl,
            eval_windows=eval_windows,
            tasks=tasks,
            tasks_dir=tasks_dir,
            data_dir=data_dir,
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            head_mode=head_mode,
            structures=structures,
            skip_first=skip_first,
            skip_last=skip_last,
            seed=seed,
            spsa_steps=spsa_steps,
            spsa_eps=spsa_eps,
            compensation=compensation,
            damping=damping,
            device_map=device_map,
            dtype=dtype,
            out_dir=out,
            progress=progress,
            trust_remote_code=trust_remote_code,
        )
    typer.echo(markdown_table(result))
    files = [*result.files, *(render_compare_report(result, report) if report is not None else [])]
    console.print("wrote " + ", ".join(str(f) for f in files))


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
