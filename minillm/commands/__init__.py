"""CLI command modules; each exposes ``register(app)`` and is listed in ``minillm.cli.COMMAND_MODULES``."""
