"""Typer options that several commands share: one definition (flag, default, help) per option.

Why: ``prune``, ``compare``, ``eval``, ``recover``, ``bench`` and ``inspect`` take the same model and
loading flags; defining each once keeps their defaults and help identical. Options that are settings of
a pruning run are fields of :class:`~minillm.recipe.Recipe` and come from there
(:func:`minillm.commands.recipe.recipe_option`); the rest are declared here. Each function returns a
fresh typer ``Option`` / ``Argument`` to use as a parameter default.
"""

from __future__ import annotations

from typing import Any

import typer

from minillm.commands.recipe import recipe_option


def model_argument() -> Any:
    return typer.Argument(..., help="Hub id, local folder (a minillm export too), or .gguf file.")


def dtype() -> Any:
    return recipe_option("dtype")


def device_map() -> Any:
    return recipe_option("device_map")


def trust_remote_code() -> Any:
    return recipe_option("trust_remote_code")


def force() -> Any:
    return recipe_option("force")


def overwrite_file() -> Any:
    return typer.Option(False, "--overwrite", help="Replace an existing --json / --report file.")
