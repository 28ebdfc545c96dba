"""``minillm compare``: one scoring per method, every (ratio, allocation) planned from it, the same result as
``prune`` would give, outputs written (markdown, CSV, JSON, PNG), and bad input failing fast."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer, write_text
from typer.testing import CliRunner

from minillm.api import prune
from minillm.calibration.data import calibration_set, evaluation_windows
from minillm.compare import FORWARD, compare
from minillm.evaluate.perplexity import perplexity


@pytest.fixture
def text(tmp_path: Path) -> Path:
    return write_text(tmp_path / "text.txt", words=2000)


def _compare(model, text: Path, tmp_path: Path, methods: list[str], ratios: list[float]):
    return compare(
        model,
        methods=methods,
        ratios=ratios,
        calib=str(text),
        calib_samples=4,
        seq_len=16,
        batch_size=2,
        eval_ppl=str(text),
        eval_windows=8,
        tokenizer=tiny_tokenizer(),
        spsa_steps=2,
        isolate=False,
        out_dir=tmp_path / "out",
    )


def test_compare_table_files_and_consistency_with_prune(tmp_path: Path, text: Path) -> None:
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = _compare(model, text, tmp_path, ["flap", "taylor-gate", "random"], [0.1, 0.2])
    assert len(result.rows) == 3 * 2 * 2
    assert {(r.method, r.ratio, r.allocation) for r in result.rows} == {
        (m, r, a)
        for m in ("flap", "taylor-gate", "random")
        for r in (0.1, 0.2)
        for a in ("uniform", "global")
    }
    for row in result.rows:
        assert abs(row.achieved_ratio - row.ratio) < 0.1
        assert row.params < result.dense_params
        assert row.perplexity is not None and row.perplexity > 1
        assert row.peak_bytes and row.peak_bytes > 0 and row.peak_vs_forward and row.peak_vs_forward > 0
    assert {r.backward_passes for r in result.rows if r.method == "taylor-gate"} == {1}
    assert result.forward_peak_bytes and result.dense_perplexity and result.dense_perplexity > 1
    assert sum(p.numel() for p in model.parameters()) == result.dense_params  # the loaded model is untouched
    names = {f.name for f in result.files}
    assert names == {"compare.md", "compare.csv", "compare.json", "compare.png"}
    rows = list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))
    assert len(rows) == 13 and rows[0]["method"] == "dense"
    table = (tmp_path / "out" / "compare.md").read_text()
    assert table.count("| flap |") == 4 and "× forward" in table
    # the compare row is exactly what `prune` with the same settings produces
    calibration = calibration_set(tiny_tokenizer(), str(text), 4, 16, 0, 2)
    pruned = prune(
        dense, ratio=0.2, criterion="flap", allocation="global", calib=calibration, spsa_steps=2
    ).model
    windows = evaluation_windows(tiny_tokenizer(), str(text), 16)[:8]
    row = next(r for r in result.rows if (r.method, r.ratio, r.allocation) == ("flap", 0.2, "global"))
    assert row.perplexity == pytest.approx(perplexity(pruned, windows, 2).perplexity, rel=1e-6)
    assert row.params == sum(p.numel() for p in pruned.parameters())


def test_single_ratio_writes_no_plot(tmp_path: Path, text: Path) -> None:
    result = _compare(tiny_model("opt"), text, tmp_path, ["wanda-sp"], [0.2])
    assert not (tmp_path / "out" / "compare.png").exists()
    assert len(result.rows) == 2


def test_forward_reference_is_not_a_criterion() -> None:
    from minillm.scoring import CRITERIA

    assert FORWARD not in CRITERIA


def _model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_unknown_method_fails_before_any_work(tmp_path: Path, text: Path) -> None:
    from minillm.cli import app, register_commands

    register_commands()
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(tmp_path / "nowhere"),
            "--methods",
            "tayler-gate",
            "--calib",
            str(text),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2
    assert "did you mean 'taylor-gate'" in result.output.lower()
    assert not out.exists()


def test_cli_bad_ratio(tmp_path: Path, text: Path) -> None:
    from minillm.cli import app, register_commands

    register_commands()
    result = CliRunner().invoke(
        app, ["compare", "--model", "x", "--methods", "random", "--ratio", "0.2,1.5", "--calib", str(text)]
    )
    assert result.exit_code == 2 and "--ratio" in result.output


@pytest.mark.slow
def test_cli_isolated_subprocess_per_method(tmp_path: Path, text: Path) -> None:
    """The real path: a model folder, each method (and the forward reference) scored in its own process."""
    from minillm.cli import app, register_commands

    register_commands()
    folder = _model_dir(tmp_path)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(folder),
            "--methods",
            "random,taylor-gate,fms-local",
            "--ratio",
            "0.2",
            "--allocation",
            "uniform",
            "--calib",
            str(text),
            "--calib-samples",
            "4",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--eval-ppl",
            str(text),
            "--eval-windows",
            "4",
            "--device-map",
            "cpu",
            "--out",
            str(out),
            "--report",
            str(out / "compare.html"),
            "--spsa-steps",
            "2",
            "--compensations",
            "bias",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["dense", "random", "taylor-gate", "fms-local"]
    assert [r["compensation"] for r in rows] == ["", "bias", "bias", "bias"]
    page = (out / "compare.html").read_text()
    assert "fms-local" in page and "<img" in page and (out / "compare.metrics.png").is_file()
    assert all(int(r["peak_bytes"]) > 0 for r in rows)
    assert torch.isfinite(torch.tensor([float(r["perplexity"]) for r in rows])).all()


def test_compensation_is_an_axis_of_the_table(tmp_path: Path, text: Path) -> None:
    from minillm.errors import UsageError

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = compare(model, methods=["magnitude"], ratios=[0.2], allocations=["uniform", "log"],
                     compensation="none,refit", calib=str(text), calib_samples=4, seq_len=16, batch_size=2,
                     eval_ppl=str(text), eval_windows=8, tokenizer=tiny_tokenizer(), isolate=False,
                     out_dir=tmp_path / "out")
    assert {(r.allocation, r.compensation) for r in result.rows} == {
        (a, c) for a in ("uniform", "log") for c in ("none", "refit")}
    ppl = {(r.allocation, r.compensation): r.perplexity for r in result.rows}
    assert ppl[("log", "none")] != ppl[("log", "refit")]
    assert result.protocol["compensation"] == "none,refit"
    rows = list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))
    assert {r["compensation"] for r in rows[1:]} == {"none", "refit"}
    assert "| comp |" in (tmp_path / "out" / "compare.md").read_text()
    # a row is what `prune` with the same settings produces
    calibration = calibration_set(tiny_tokenizer(), str(text), 4, 16, 0, 2)
    pruned = prune(dense, ratio=0.2, criterion="magnitude", allocation="log", compensation="refit",
                   calib=calibration).model
    windows = evaluation_windows(tiny_tokenizer(), str(text), 16)[:8]
    assert ppl[("log", "refit")] == pytest.approx(perplexity(pruned, windows, 2).perplexity, rel=1e-6)
    with pytest.raises(UsageError, match="--compensation takes a comma list"):
        compare(dense, methods=["magnitude"], compensation="none,refti", calib=str(text),
                tokenizer=tiny_tokenizer(), isolate=False)
