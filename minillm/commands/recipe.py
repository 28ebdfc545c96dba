"""Command-line options made from :class:`~minillm.recipe.Recipe`'s fields: every option is declared once.

Why: a setting of a pruning run (its flag, type, default, help and choices) is a field of the pydantic
``Recipe``; the ``prune`` command, ``compare``'s shared options, the loading options of the other
commands, the Python API and an export's stored recipe all read that one declaration, so none of them
can drift. A new ``Recipe`` field is a new ``minillm prune`` option without touching the command.

The command line stays a thin layer: every generated option's value is plain text or a number, and
the values are validated by the ``Recipe`` itself (one-line errors naming the flag), not by click.
A field's flag is ``--field-name`` (``--x/--no-x`` for a switch) unless its ``json_schema_extra``
may name others (``{"flags": ["--model", "-m"]}``) or keep a field off the command line
(``{"cli": False}``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import typer
from pydantic.fields import FieldInfo

from minillm.recipe import Recipe

F = TypeVar("F", bound=Callable[..., Any])


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def on_command_line(name: str) -> bool:
    """Whether the field ``name`` is a command-line option (mappings and free text are not)."""
    return _extra(Recipe.model_fields[name]).get("cli", True) is not False


def cli_fields() -> list[str]:
    """The Recipe fields that are command-line options, in declaration order (the order of ``--help``)."""
    return [name for name in Recipe.model_fields if on_command_line(name)]


def choices(name: str) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` field (``()`` for any other)."""
    annotation = Recipe.model_fields[name].annotation
    return tuple(str(a) for a in typing.get_args(annotation)) if typing.get_origin(annotation) is Literal \
        else ()


def cli_type(name: str) -> type:
    """What the command line parses: booleans and numbers as such, everything else as text."""
    annotation = Recipe.model_fields[name].annotation
    return annotation if annotation in (bool, int, float) else str


def flags(name: str) -> list[str]:
    """The option's own flags (``[]``: typer's ``--field-name``, ``--x/--no-x`` for a switch)."""
    return list(_extra(Recipe.model_fields[name]).get("flags", []))


def recipe_option(name: str) -> Any:
    """A fresh typer ``Option`` for the Recipe field ``name``: its flags, default, help and choices."""
    field = Recipe.model_fields[name]
    allowed = choices(name)
    return typer.Option(field.get_default(call_default_factory=True), *flags(name), help=field.description,
                        metavar=f"[{'|'.join(allowed)}]" if allowed else None)


def recipe_parameters(names: Iterable[str]) -> list[inspect.Parameter]:
    """Keyword-only parameters (annotation and typer ``Option`` default) for the Recipe fields ``names``."""
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=recipe_option(name),
                              annotation=cli_type(name)) for name in names]


def with_recipe_options(*, exclude: Iterable[str] = (), only: Iterable[str] | None = None
                        ) -> Callable[[F], F]:
    """Give a typer command one option per Recipe field (``only`` those, or all but ``exclude``).

    The command declares its own options as usual and takes the generated ones as ``**settings``;
    they are inserted into its signature, before the command's own keyword-only options (e.g.
    ``-v``/``-q``), which is what typer reads to build the options.
    """
    skipped = set(exclude)
    names = [n for n in (cli_fields() if only is None else list(only)) if n not in skipped]

    def decorate(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values()
               if p.kind != inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{fn.__name__} declares {sorted(clash)} itself; exclude them from the recipe "
                            "options")
        leading = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        trailing = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*leading, *recipe_parameters(names), *trailing])
        return fn

    return decorate
