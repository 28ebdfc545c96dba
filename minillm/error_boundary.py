"""The one error boundary of the ``minillm`` commands: any exception becomes one line and a non-zero exit.

Why: a traceback tells a user nothing about what to do, can run to hundreds of lines, and (with rich's
``show_locals``) once printed the Hub token. Every command runs inside :func:`error_boundary`: a
:class:`~minillm.errors.UsageError` (bad input, the message names the fix) exits with 2; anything else
from loading, parsing, I/O or a library is described in one line (what failed, what to do) and exits
with 1. ``minillm -v COMMAND`` (or ``MINILLM_TRACEBACK=1``) re-raises instead, to show the traceback —
typer's pretty tracebacks are configured without local variables.

Secrets never reach the line: Hub tokens (``hf_…``), ``Authorization: Bearer …`` values and any value
registered with :func:`register_secret` are masked.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from minillm.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])
TRACEBACK_ENV = "MINILLM_TRACEBACK"
_state = {"traceback": False}
_secrets: set[str] = set()
_PATTERNS = (
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"(?i)(bearer\s+)[^\s'\",]+"), r"\1***"),
    (re.compile(r"(?i)(token[\"']?\s*[:=]\s*[\"']?)[^\s'\",]+"), r"\1***"),
)


def show_tracebacks(on: bool = True) -> None:
    """``minillm -v``: let exceptions through so the traceback is printed."""
    _state["traceback"] = on


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in an error line."""
    if value and len(value) >= 4:
        _secrets.add(value)


def scrub(text: str) -> str:
    """``text`` with tokens and registered secrets replaced by ``***``."""
    for env in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        register_secret(os.environ.get(env))
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def describe(exc: BaseException) -> str:
    """One line for ``exc``: what failed and, where it can be said, what to do."""
    from minillm.registry import UnknownNameError

    if isinstance(exc, (UsageError, UnknownNameError)):
        return " ".join(str(exc).split("\n"))
    name = type(exc).__name__
    detail = _first_line(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device ({detail}); free some space or write to another disk"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({detail}); give a plain-text (.txt/.jsonl/.json) file"
    if name == "SafetensorError" or "safetensors" in type(exc).__module__:
        return f"a .safetensors weights file is corrupt or truncated ({detail}); re-download or re-export it"
    if isinstance(exc, PermissionError):
        return f"permission denied ({detail}); choose a path you can read and write"
    if isinstance(exc, FileNotFoundError):
        return f"file not found ({detail}); check the path"
    if isinstance(exc, OSError):
        return f"cannot read or write ({detail}); check the path, the network and the disk"
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --batch-size/--seq-len, --max-memory or --streaming"
    if "OutOfMemory" in name:
        return f"out of device memory ({detail}); try a smaller --batch-size/--seq-len or --max-memory"
    return f"{name}: {detail} (run `minillm -v …` for the traceback)"


def _fail(exc: BaseException) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    code = 2 if isinstance(exc, UsageError) or type(exc).__name__ == "UnknownNameError" else 1
    line = escape(scrub(describe(exc)))  # a message may hold brackets rich would read as markup
    Console(stderr=True).print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _wants_traceback(kwargs: dict[str, Any]) -> bool:
    return _state["traceback"] or bool(os.environ.get(TRACEBACK_ENV)) or kwargs.get("verbose") is True


def error_boundary(fn: F) -> F:
    """Run a command; any exception → one line on stderr, exit 2 (bad input) or 1 (anything else)."""
    if getattr(fn, "__minillm_boundary__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:
            import click

            if isinstance(exc, click.exceptions.ClickException) or _wants_traceback(kwargs):
                raise
            raise _fail(exc) from None

    wrapper.__minillm_boundary__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def guard_commands(app: typer.Typer) -> None:
    """Put every command of ``app`` (and of its sub-apps) inside :func:`error_boundary`."""
    for command in app.registered_commands:
        if command.callback is not None:
            command.callback = error_boundary(command.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_commands(group.typer_instance)
