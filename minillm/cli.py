"""The ``minillm`` command: thin typer commands that parse options and call one API function each."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _register_subapps() -> None:
    """Secondary pruners (CNN, LSTM) bring their own typer sub-apps."""
    from minillm.lstm.cli import app as lstm_app
    from minillm.vision.cli import app as cnn_app

    app.add_typer(cnn_app, name="cnn", help="CNN channel pruning (IFSO and baselines).")
    app.add_typer(lstm_app, name="lstm", help="LSTM hidden-unit pruning and dynamic sparse training.")


def main() -> None:
    _register_subapps()
    app()
