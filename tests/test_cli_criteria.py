"""``minillm criteria`` lists every criterion with its summary and marks the default."""

from __future__ import annotations

from typer.testing import CliRunner

from minillm.cli import app
from minillm.defaults import DEFAULT_CRITERION
from minillm.scoring import CRITERIA


def test_lists_every_criterion_with_a_summary() -> None:
    result = CliRunner().invoke(app, ["criteria"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in CRITERIA.names():
        assert CRITERIA.summary(name), f"{name} has no summary"
        row = next(line for line in lines if line.split()[0] == name)
        assert CRITERIA.summary(name).split()[0] in row
    assert "fms-local" in CRITERIA and "fms-lowmem" in CRITERIA  # one registry: no streaming-only names
    assert f"{DEFAULT_CRITERION} (default)" in result.output
