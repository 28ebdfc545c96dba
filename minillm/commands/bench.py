"""``minillm bench MODEL [--compare-to DENSE]``: prefill/decode tokens/s, peak memory, ratio to dense."""

from __future__ import annotations

from pathlib import Path

import typer

from minillm.cli import console, friendly_errors, progress_bars
from minillm.commands import options


@friendly_errors
def bench(
    model: str = options.model_argument(),
    compare_to: str = typer.Option(
        None, "--compare-to", help="Reference model (the dense one), timed interleaved."
    ),
    batch_sizes: str = typer.Option("1,4", help="Comma-separated batch sizes."),
    prompt_lens: str = typer.Option(
        "64,256", help="Comma-separated prompt lengths (prefill tokens per sequence)."
    ),
    new_tokens: int = typer.Option(32, help="Greedy decode steps per case."),
    repeats: int = typer.Option(5, help="Timed repeats per case (medians are reported)."),
    warmup: int = typer.Option(1, help="Untimed warm-up rounds."),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu, cuda, cuda:1, …"),
    dtype: str = options.dtype(),
    threads: int = typer.Option(
        None, help="CPU threads; the process is pinned to that many CPUs (default: all it may use)."
    ),
    seed: int = typer.Option(0, help="Seed of the random prompt ids."),
    json_out: str = typer.Option(None, "--json", help="Also write rows and ratios as JSON here."),
    overwrite: bool = options.overwrite_file(),
    trust_remote_code: bool = options.trust_remote_code(),
) -> None:
    """Time prefill and decode (tokens/s) at a few batch sizes and lengths; with --compare-to, the ratios."""
    import json

    import torch

    from minillm.loading import check_remote_code, load_model
    from minillm.option_checks import check_device, check_seed
    from minillm.output_guard import check_output_file
    from minillm.progress import configure_logging
    from minillm.speed import benchmark, cases, geometric_mean, markdown, parse_ints, pin_threads, ratios

    check_device(device, "--device")
    check_seed(seed)
    check_output_file(json_out, overwrite, "--json", inputs=(model, compare_to))
    for source in (model, compare_to):
        if source:
            check_remote_code(source, trust_remote_code)
    threads, cpus = pin_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    speed_cases = cases(
        parse_ints(batch_sizes, "--batch-sizes"), parse_ints(prompt_lens, "--prompt-lens"), new_tokens
    )
    configure_logging(1, console.is_terminal)
    labels = _labels(model, compare_to)
    models = {}
    if compare_to:
        models[labels[1]] = load_model(compare_to, device_map=device, dtype=dtype,
                                       trust_remote_code=trust_remote_code)
    models[labels[0]] = load_model(model, device_map=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with progress_bars() as progress:
        rows = benchmark(models, speed_cases, repeats, warmup, seed, progress)
    reference = labels[1] if compare_to else None
    typer.echo(
        f"minillm bench ({device}, {threads} torch threads pinned to CPUs {_cpu_list(cpus)}, "
        f"median of {repeats} interleaved repeats; ratio spread = IQR of per-repeat ratios)"
    )
    typer.echo(markdown(rows, reference))
    summary = {}
    if reference:
        r = ratios(rows, reference)
        summary = {
            "prefill_latency_ratio_geomean": geometric_mean([x["prefill_latency_ratio"] for x in r]),
            "decode_latency_ratio_geomean": geometric_mean([x["decode_latency_ratio"] for x in r]),
        }
        typer.echo(
            f"latency vs {reference} (geometric mean over cases): prefill "
            f"{summary['prefill_latency_ratio_geomean']:.3f}×, "
            f"decode {summary['decode_latency_ratio_geomean']:.3f}×"
        )
    if json_out:
        payload = {
            "model": model,
            "reference": compare_to,
            "device": device,
            "threads": threads,
            "cpus": cpus,
            "rows": [r.to_dict() for r in rows],
            "ratios": ratios(rows, reference) if reference else [],
            **summary,
        }
        Path(json_out).write_text(json.dumps(payload, indent=1))


def _cpu_list(cpus: list[int]) -> str:
    """``0-3`` or ``0,2,5`` (``?`` when the OS does not report affinity)."""
    if not cpus:
        return "?"
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
    return ",".join(map(str, cpus))


def _labels(model: str, reference: str | None) -> tuple[str, str]:
    """Short, distinct row labels: folder names, or the full sources when those collide."""
    short = Path(model.rstrip("/")).name or model
    if reference is None:
        return short, ""
    ref = Path(reference.rstrip("/")).name or reference
    return (short, ref) if short != ref else (model, reference)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
