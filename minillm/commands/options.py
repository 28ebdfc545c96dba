"""Typer options that several commands share: one definition (flag, default, help) per option.

Why: ``prune``, ``compare``, ``eval``, ``recover``, ``bench`` and ``inspect`` take the same model,
calibration, layer and loading flags; defining each once keeps their defaults and help identical.
Each function returns a fresh typer ``Option`` / ``Argument`` to use as a parameter default.
"""

from __future__ import annotations

from typing import Any

import typer


def model_argument() -> Any:
    return typer.Argument(..., help="Hub id, local folder (a minillm export too), or .gguf file.")


def dtype() -> Any:
    return typer.Option("auto", help="auto (the checkpoint's), float32, bfloat16, float16.")


def device_map() -> Any:
    return typer.Option("auto", help="accelerate device map: auto, balanced, cpu, cuda:0, …")


def calib() -> Any:
    return typer.Option("wikitext2", help="Calibration text: .txt/.jsonl/.json file or dataset name.")


def calib_samples() -> Any:
    return typer.Option(32, help="Number of calibration windows.")


def head_mode() -> Any:
    return typer.Option("auto", help="kv: remove whole key/value groups; query: query heads evenly; "
                        "auto: query when every layer has a single key/value head, else kv.")


def structures() -> Any:
    return typer.Option("both", help="What to prune: both, mlp or attn.")


def skip_first() -> Any:
    return typer.Option(0, help="Keep the first N decoder layers whole.")


def skip_last() -> Any:
    return typer.Option(0, help="Keep the last N decoder layers whole.")


def spsa_eps() -> Any:
    return typer.Option(1e-3, help="SPSA perturbation size.")
