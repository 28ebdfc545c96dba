"""``minillm lstm train|prune|eval`` end to end on a toy corpus, and its error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minillm.lstm.cli import app
from minillm.lstm.export import load_model

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    words = [f"w{i}" for i in range(15)]
    for split, lines in (("train", 120), ("valid", 20), ("test", 20)):
        rows = [" ".join(words[(i * 7 + k) % 15] for k in range(2 + i % 5)) for i in range(lines)]
        (folder / f"ptb.{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "dense"
    result = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), "--embed", "8",
                                 "--hidden", "12", "--epochs", "1", "--batch-size", "4", "--bptt", "8"])
    assert result.exit_code == 0, result.output
    assert "valid perplexity" in result.stdout
    return out


def run_ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def run_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_prune_then_eval_round_trip(trained: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = run_ok(["prune", str(trained), "--data", str(corpus), "--out", str(out),
                     "--criterion", "activation", "--keep", "0.5", "--finetune-steps", "3",
                     "--batch-size", "4", "--calib-windows", "2"])
    assert "Prune plan" in result.stdout and "valid ppl fine-tuned" in result.stdout
    loaded = load_model(out)
    assert loaded.model.config.hidden_sizes == (6, 6)
    plan = loaded.side_files["prune_plan.json"]
    assert plan["kept_sizes"] == [6, 6] and plan["criterion"] == "activation"
    metrics = loaded.side_files["metrics.json"]
    evaluated = run_ok(["eval", str(out), "--data", str(corpus), "--split", "test"])
    assert f"{metrics['test_ppl']:,.2f}" in evaluated.stdout


def test_dry_run_writes_nothing(trained: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = run_ok(["prune", str(trained), "--data", str(corpus), "--out", str(out), "--criterion", "fms",
                     "--keep", "0.25", "--spsa-steps", "2", "--calib-windows", "1", "--dry-run"])
    assert "dry run" in result.stdout and "│     0 │            12 │            3 │" in result.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dst_training_reports_learned_sparsity(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "dst"
    result = run_ok(["train", "--data", str(corpus), "--out", str(out), "--embed", "8", "--hidden", "12",
                     "--epochs", "1", "--batch-size", "4", "--bptt", "8", "--dst", "--dst-alpha", "1.0",
                     "--lr", "0.02"])
    assert "DST sparsity learned per layer" in result.stdout
    report = json.loads((out / "dst_report.json").read_text())
    assert 0.0 < report["density"] < 1.0
    assert {layer["name"] for layer in report["layers"]} == {
        "rnns.0.weight_ih_l0", "rnns.0.weight_hh_l0", "rnns.1.weight_ih_l0", "rnns.1.weight_hh_l0",
        "decoder.weight"}
    loaded = load_model(out)  # saved densified: plain LSTMs whose zeros are the learned mask
    zero_fraction = float((loaded.model.rnns[0].weight_hh_l0 == 0).float().mean())
    layer = next(r for r in report["layers"] if r["name"] == "rnns.0.weight_hh_l0")
    assert zero_fraction == pytest.approx(1 - layer["density"])


def test_bad_inputs_fail_with_one_line(trained: Path, corpus: Path, tmp_path: Path) -> None:
    assert "does not exist" in run_error(["eval", str(tmp_path / "nope"), "--data", str(corpus)])
    assert "train.txt" in run_error(["eval", str(trained), "--data", str(tmp_path)])
    prune = ["prune", str(trained), "--data", str(corpus), "--out", str(tmp_path / "x")]
    assert "Did you mean 'magnitude'" in run_error([*prune, "--criterion", "magnitud"])
    assert "keep ratio" in run_error([*prune, "--keep", "0"])
    assert "--out" in run_error(["prune", str(trained), "--data", str(corpus)])
    assert "already exists" in run_error(
        ["train", "--data", str(corpus), "--out", str(trained), "--epochs", "1"])
    assert "unknown split" in run_error(["eval", str(trained), "--data", str(corpus), "--split", "dev"])
    assert list(tmp_path.iterdir()) == []
