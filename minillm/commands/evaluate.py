"""``minillm eval``: perplexity (and, with the eval extra, lm-eval tasks) of a model or an export."""

from __future__ import annotations

import typer
from rich.table import Table

from minillm.cli import console, friendly_errors, progress_bars
from minillm.errors import UsageError


@friendly_errors
def evaluate(
    model: str = typer.Argument(..., help="Hub id, local folder (a minillm export too), or .gguf file."),
    ppl: str = typer.Option(None, help="Perplexity text: .txt/.jsonl/.json file or dataset name."),
    seq_len: int = typer.Option(128, help="Tokens per perplexity window."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    device_map: str = typer.Option("auto", help="accelerate device map."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    json_out: str = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Measure perplexity (non-overlapping windows) of a model or an export."""
    import json
    from pathlib import Path

    from minillm.calibration.data import evaluation_windows
    from minillm.evaluate.perplexity import perplexity
    from minillm.loading import load_model, load_tokenizer

    if ppl is None:
        raise UsageError("nothing to evaluate: pass --ppl <text file or dataset name>")
    tokenizer = load_tokenizer(model)
    windows = evaluation_windows(tokenizer, ppl, seq_len)
    loaded = load_model(model, device_map=device_map, dtype=dtype)
    with progress_bars() as progress:
        result = perplexity(loaded, windows, batch_size, lambda d, t: progress("perplexity", d, t))
    table = Table(title=f"minillm eval {model}", show_header=False)
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("protocol", result.protocol)
    console.print(table)
    typer.echo(f"perplexity {result.perplexity:.4f} ({result.windows} windows x {result.seq_len} tokens)")
    if json_out:
        payload = {"model": model, "ppl_source": ppl, "perplexity": result.perplexity, "windows": result.windows,
                   "seq_len": result.seq_len, "tokens": result.tokens, "protocol": result.protocol}
        Path(json_out).write_text(json.dumps(payload, indent=1))



def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
