"""``minillm inspect MODEL``: architecture, prunable groups, params by part, reachable ratios, export plan."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from minillm.cli import friendly_errors
from minillm.commands import options

# inspect's tables are its output: stdout, so they can be piped; wide enough not to truncate in files
stdout = Console() if sys.stdout.isatty() else Console(width=120)


def _layer_rows(layers: list) -> list[tuple[str, ...]]:
    """Consecutive layers with identical groups share one row."""
    rows: list[tuple[str, ...]] = []
    start = 0
    key = lambda r: (
        r.heads,
        r.kv_heads,
        r.head_dim,
        r.channels,
        r.query_head_cost,
        r.kv_head_cost,
        r.channel_cost,
    )
    for i in range(1, len(layers) + 1):
        if i == len(layers) or key(layers[i]) != key(layers[start]):
            first, last = layers[start].layer, layers[i - 1].layer
            r = layers[start]
            rows.append(
                (
                    str(first) if first == last else f"{first}-{last}",
                    str(r.heads),
                    str(r.kv_heads),
                    str(r.head_dim),
                    str(r.channels),
                    f"{r.query_head_cost:,}",
                    f"{r.kv_head_cost:,}",
                    f"{r.channel_cost:,}",
                    f"{r.params:,}",
                )
            )
            start = i
    return rows


@friendly_errors
def inspect(
    model: str = options.model_argument(),
    skip_first: int = typer.Option(0, help="Reachable ratios with the first N layers kept whole."),
    skip_last: int = typer.Option(0, help="Reachable ratios with the last N layers kept whole."),
    json_out: str = typer.Option(None, "--json", help="Also write everything as JSON here."),
    overwrite: bool = options.overwrite_file(),
    trust_remote_code: bool = options.trust_remote_code(),
) -> None:
    """Show a model's architecture, prunable groups per layer, parameters by part and reachable ratios."""
    import json
    from pathlib import Path

    from minillm.output_guard import check_output_file

    check_output_file(json_out, overwrite, "--json", inputs=(model,))

    from minillm.inspect import inspect_model

    info = inspect_model(model, skip_first, skip_last, trust_remote_code=trust_remote_code)
    arch = Table(title=f"minillm inspect {model}", show_header=False)
    arch.add_row("architecture", f"{info.architecture} ({info.model_type})")
    arch.add_row("decoder layers", str(info.num_layers))
    arch.add_row("hidden size / vocabulary", f"{info.hidden_size} / {info.vocab_size:,}")
    arch.add_row("tied embeddings", "yes" if info.tied_embeddings else "no")
    arch.add_row("parameters", f"{info.total_params:,}")
    for name, text in info.structure.items():
        arch.add_row(name, text)
    stdout.print(arch)
    parts = Table(title="parameters by part")
    for column in ("part", "parameters", "share"):
        parts.add_column(column, justify="right" if column != "part" else "left")
    for name, count in info.params_by_part.items():
        if count:
            parts.add_row(name, f"{count:,}", f"{count / info.total_params:.1%}")
    stdout.print(parts)
    groups = Table(title="prunable groups per layer (cost = parameters removed with one)")
    for column in (
        "layers",
        "heads",
        "kv heads",
        "head dim",
        "channels",
        "cost/head",
        "cost/kv head",
        "cost/channel",
        "layer params",
    ):
        groups.add_column(column, justify="right")
    for row in _layer_rows(info.layers):
        groups.add_row(*row)
    stdout.print(groups)
    reach = Table(
        title=f"largest reachable --ratio (layers {info.skip_first}-{info.num_layers - info.skip_last - 1} "
        "pruned, one head unit and one channel kept per layer)"
    )
    reach.add_column("setting")
    reach.add_column("global", justify="right")
    reach.add_column("uniform", justify="right")
    for name in dict.fromkeys(key.rsplit(", ", 1)[0] for key in info.reachable):
        reach.add_row(
            name, f"{info.reachable[name + ', global']:.1%}", f"{info.reachable[name + ', uniform']:.1%}"
        )
    stdout.print(reach)
    if info.export:
        plan = info.export.get("plan") or {}
        export = Table(title="minillm export", show_header=False)
        export.add_row("pruned from", str(info.export.get("base_model")))
        export.add_row(
            "criterion",
            f"{info.export.get('criterion')} ({plan.get('allocation')}, head mode {plan.get('head_mode')})",
        )
        export.add_row(
            "parameters",
            f"{info.export.get('params_before') or 0:,} → "
            f"{info.export.get('params_after') or 0:,} "
            f"(target {plan.get('target_ratio') or 0:.0%}, achieved "
            f"{info.export.get('achieved_ratio') or 0:.2%})",
        )
        if info.export.get("recipe"):
            export.add_row(
                "reproduce", f"minillm prune --recipe {Path(model) / 'minillm.json'} --out <folder>"
            )
        stdout.print(export)
    if json_out:
        Path(json_out).write_text(json.dumps(info.to_dict(), indent=1, default=str))


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
