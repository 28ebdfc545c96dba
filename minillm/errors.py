"""User-facing errors: raised for bad input, printed by the CLI as one line with a non-zero exit."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user. The message says what is wrong and how to fix it, on one line."""
