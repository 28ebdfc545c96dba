"""``minillm push``: upload an export to the Hugging Face Hub in one commit, with a generated model card."""

from __future__ import annotations

import typer

from minillm.cli import console, friendly_errors


@friendly_errors
def push(
    folder: str = typer.Argument(..., help="Export folder made by `minillm prune` or `minillm recover`."),
    repo: str = typer.Option(..., help="Hub repo id, user/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repo as private."),
    eval_json: str = typer.Option(
        None,
        "--eval",
        help="`minillm eval --json` output to put in the model card "
        "(default: minillm_eval.json in the folder, if present).",
    ),
    license: str = typer.Option(None, help="License id for the card (default: carried from the base model)."),
    token: str = typer.Option(None, help="Hub token (default: your `hf auth login` token or $HF_TOKEN)."),
    dry_run: bool = typer.Option(False, help="Print the files and the model card; upload nothing."),
) -> None:
    """Create the Hub repo and upload the export (weights, config, tokenizer, card) in one commit."""
    from minillm.hub import build_upload
    from minillm.hub import push as push_api
    from minillm.memory import human_bytes

    upload = build_upload(
        folder, repo, private=private, evaluation=eval_json, license=license, online=not dry_run
    )
    if dry_run:
        typer.echo(f"would upload to {repo} ({'private' if private else 'public'}) in one commit:")
        for name, size in upload.files:
            typer.echo(f"  {name}  ({human_bytes(size)})")
        for name in upload.skipped:
            typer.echo(f"  skipped (symbolic link or hidden, never uploaded): {name}")
        typer.echo("  README.md  (generated model card, below)\n")
        typer.echo(upload.card)
        return
    url = push_api(upload, token=token)
    console.print(f"uploaded {len(upload.operations)} files to https://huggingface.co/{repo} ({url})")


def register(app: typer.Typer) -> None:
    app.command("push")(push)
