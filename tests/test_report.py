"""Reports: prune HTML with the per-layer chart and PNGs, compare report from rows, progress output."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer
from rich.console import Console

from minillm.errors import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _prune(tmp_path: Path, calib_file: Path, **kw):
    from minillm.api import prune

    return prune(
        tiny_model("llama"),
        ratio=0.3,
        calib=str(calib_file),
        tokenizer=tiny_tokenizer(),
        calib_samples=4,
        seq_len=16,
        spsa_steps=1,
        device_map=None,
        **kw,
    )


def test_prune_report_has_the_per_layer_chart(tmp_path, calib_file):
    report = tmp_path / "rep" / "report.html"
    result = _prune(tmp_path, calib_file, out=tmp_path / "out", allocation="global", report=report)
    page = report.read_text()
    assert 'alt="per-layer chart" src="data:image/png;base64,' in page
    assert "Kept heads and channels per layer" in page and "Score distributions" in page
    assert "Memory and parameters over time" in page and "Recipe" in page
    for name in ("widths", "scores", "timeline"):
        assert (tmp_path / "rep" / f"report.{name}.png").read_bytes().startswith(PNG_MAGIC)
    for layer in result.plan.layers:  # the per-layer table lists every layer's kept/original widths
        assert f"{len(layer.channels)} / 96" in page
    stages = [s.stage for s in result.timeline.samples if s.params is not None]
    assert stages == ["loaded", "scored", "pruned", "exported"]
    params = [s.params for s in result.timeline.samples if s.params is not None]
    assert params[0] == result.plan.params_before and params[-1] == result.plan.params_after


def test_dry_run_report_and_cli_flag(tmp_path, calib_file):
    from typer.testing import CliRunner

    from minillm.cli import app

    _prune(tmp_path, calib_file, dry_run=True, report=tmp_path / "dry.html")
    assert "per-layer chart" in (tmp_path / "dry.html").read_text()
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = CliRunner().invoke(
        app,
        [
            "prune",
            "-m",
            str(folder),
            "--calib",
            str(calib_file),
            "--calib-samples",
            "4",
            "--seq-len",
            "16",
            "--spsa-steps",
            "1",
            "--device-map",
            "cpu",
            "--out",
            str(tmp_path / "o"),
            "--report",
            str(tmp_path / "cli.html"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "per-layer chart" in (tmp_path / "cli.html").read_text()
    assert "timings: load" in out.output and "\r" not in out.output and "\x1b[" not in out.output
    stored = __import__("json").loads((tmp_path / "o" / "minillm.json").read_text())["recipe"]
    assert stored["report"] == str(tmp_path / "cli.html")


def test_compare_report_from_synthetic_rows(tmp_path):
    from minillm.compare.report import render_compare_report

    rows = [
        {
            "method": "fms",
            "ratio": 0.2,
            "allocation": "uniform",
            "perplexity": 31.5,
            "peak_bytes": 3 * 2**30,
            "scoring_seconds": 40.2,
            "accuracy": {"piqa": 0.61, "boolq": 0.55},
        },
        {
            "method": "magnitude",
            "ratio": 0.2,
            "allocation": "uniform",
            "perplexity": 1200.0,
            "peak_bytes": 2 * 2**30,
            "scoring_seconds": 1.1,
            "accuracy": {"piqa": 0.52, "boolq": 0.41},
        },
        {
            "method": "fms",
            "ratio": 0.2,
            "allocation": "global",
            "perplexity": None,
            "peak_bytes": None,
            "scoring_seconds": 40.2,
            "accuracy": {},
        },
    ]
    files = render_compare_report(rows, tmp_path / "compare.html")
    page = files[0].read_text()
    assert "<th>accuracy.piqa</th>" in page and "magnitude" in page and "1,200" in page
    assert 'alt="compare metrics"' in page
    assert files[1].name == "compare.metrics.png" and files[1].read_bytes().startswith(PNG_MAGIC)


def test_compare_report_accepts_compare_rows(tmp_path):
    compare = pytest.importorskip("minillm.compare")
    row = compare.CompareRow("fms", 0.2, "uniform", 0.201, 1000, 25.0, 2**20, 1.3, 2.0, 5, 0, {"piqa": 0.6})
    from minillm.compare.report import render_compare_report

    files = render_compare_report([row], tmp_path / "c.html")
    assert "accuracy.piqa" in files[0].read_text()


def test_compare_report_rejects_empty_and_odd_rows(tmp_path):
    from minillm.compare.report import render_compare_report

    with pytest.raises(UsageError, match="no rows"):
        render_compare_report([], tmp_path / "x.html")
    with pytest.raises(UsageError, match="mappings or dataclasses"):
        render_compare_report([42], tmp_path / "x.html")


def test_missing_matplotlib_names_the_extra(monkeypatch):
    from minillm.report import require_matplotlib

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"minillm-prune\[report\]"):
        require_matplotlib()


def test_progress_on_a_non_terminal_is_plain_throttled_lines():
    from minillm.progress import ProgressReporter, timings_line

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80)
    with ProgressReporter(console, verbosity=1, interval=3600) as progress:
        for step in range(1, 101):
            progress("SPSA perturbations", step, 100)
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("SPSA perturbations: 1/100 (1%)")  # the first update, then only the last
    assert lines[-1].startswith("SPSA perturbations: 100/100 (100%)") and len(lines) == 2
    assert "\r" not in buffer.getvalue() and "\x1b" not in buffer.getvalue()
    steps = progress.step_seconds()
    assert steps["SPSA perturbations"][0] == 100
    line = timings_line({"loaded": 1.0, "scored": 2.0}, steps, 3.5)
    assert (
        line.startswith("timings: load 1.0 s · scoring 2.0 s (SPSA perturbations 100 ×")
        and "total 3.5 s" in line
    )
    quiet = io.StringIO()
    with ProgressReporter(Console(file=quiet, force_terminal=False), verbosity=0) as progress:
        progress("x", 1, 1)
    assert quiet.getvalue() == ""
