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
    return typer.Option(128, help="Number of calibration windows (of --seq-len tokens).")


def head_mode() -> Any:
    from minillm.defaults import DEFAULT_HEAD_MODE

    return typer.Option(DEFAULT_HEAD_MODE, help="kv: remove whole key/value groups; query: query heads "
                        "evenly in every kv group (all kv heads kept); auto: query when every layer has a "
                        "single key/value head, else kv.")


def structures() -> Any:
    return typer.Option("both", help="What to prune: a comma list of attn, mlp, hidden, layers "
                        "(both = attn,mlp), e.g. attn,mlp,hidden or layers.")


def round_to() -> Any:
    return typer.Option(1, help="MLP width and hidden size in multiples of N (64/128 suit GPU kernels).")


def layer_score() -> Any:
    return typer.Option("influence", help="Layer score for --structures layers: influence (ShortGPT "
                        "1 - cos(h_in, h_out)) or loss (calibration loss change when skipped).")


def skip_first() -> Any:
    return typer.Option(0, help="Keep the first N decoder layers whole.")


def skip_last() -> Any:
    return typer.Option(0, help="Keep the last N decoder layers whole.")


def spsa_eps() -> Any:
    return typer.Option(1e-3, help="SPSA perturbation size.")


def trust_remote_code() -> Any:
    return typer.Option(False, "--trust-remote-code",
                        help="Run model code shipped in the model folder (per-layer minillm exports need "
                        "it); "
                        "only for folders you trust.")


def force() -> Any:
    return typer.Option(False, "--force",
                        help="With --overwrite: replace --out even if it is not a minillm export.")


def overwrite_file() -> Any:
    return typer.Option(False, "--overwrite", help="Replace an existing --json / --report file.")


def compensation() -> Any:
    from minillm.defaults import DEFAULT_COMPENSATION

    return typer.Option(DEFAULT_COMPENSATION, help="After the cut, block by block on the pruned prefix: "
                        "refit (least squares on o_proj/down_proj), bias (FLAP's mean folding) or none.")


def damping() -> Any:
    from minillm.defaults import DEFAULT_DAMPING

    return typer.Option(DEFAULT_DAMPING, help="λ of the compensation's H + λ·mean(diag H)·I.")
