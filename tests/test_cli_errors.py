"""Bad input: one line naming the fix, a non-zero exit, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer, write_text
from typer.testing import CliRunner

from minillm.cli import app, register_commands
from minillm.errors import UsageError
from minillm.plan import LayerPlan
from minillm.surgery import validate_layer_plan

register_commands()
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _prune(workdir: Path, *args: str):
    before = sorted(p.name for p in workdir.iterdir())
    result = runner.invoke(app, ["prune", *args])
    after = sorted(p.name for p in workdir.iterdir())
    return result, before, after


def _assert_clean_failure(result, before, after, *needles: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.output.strip()
    assert "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    assert before == after


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_ratio_out_of_range(tmp_path: Path, model_dir: Path, ratio: str) -> None:
    calib = write_text(tmp_path / "c.txt")
    out = tmp_path / "out"
    result, before, after = _prune(tmp_path, "--model", str(model_dir), "--ratio", ratio,
                                   "--calib", str(calib), "--out", str(out))
    _assert_clean_failure(result, before, after, "--ratio")


def test_ratio_that_empties_a_layer(tmp_path: Path, model_dir: Path) -> None:
    calib = write_text(tmp_path / "c.txt")
    result, before, after = _prune(tmp_path, "--model", str(model_dir), "--ratio", "0.9",
                                   "--calib", str(calib), "--spsa-steps", "1", "--out", str(tmp_path / "out"))
    _assert_clean_failure(result, before, after, "empty a layer", "--ratio below")


def test_plan_that_breaks_gqa_is_rejected() -> None:
    uneven = LayerPlan(index=0, heads=[0, 1, 2], kv_heads=[0, 1], channels=[0])
    with pytest.raises(UsageError, match="num_key_value_groups"):
        validate_layer_plan(uneven, num_heads=4, num_kv_heads=2)
    orphan = LayerPlan(index=0, heads=[2, 3], kv_heads=[0], channels=[0])
    with pytest.raises(UsageError, match="removed key/value head"):
        validate_layer_plan(orphan, num_heads=4, num_kv_heads=2)


def test_unknown_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    calib = write_text(tmp_path / "c.txt")
    result, before, after = _prune(tmp_path, "--model", str(folder), "--calib", str(calib), "--out",
                                   str(tmp_path / "out"))
    _assert_clean_failure(result, before, after, "unsupported architecture 'gpt2'", "llama", "opt", "qwen3")


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_bad_calibration_file(tmp_path: Path, model_dir: Path, kind: str) -> None:
    calib = tmp_path / "calib.txt"
    if kind == "empty":
        calib.write_text("")
    result, before, after = _prune(tmp_path, "--model", str(model_dir), "--calib", str(calib), "--out",
                                   str(tmp_path / "out"))
    _assert_clean_failure(result, before, after, "calib", "empty" if kind == "empty" else "does not exist")


def test_existing_output_without_overwrite(tmp_path: Path, model_dir: Path) -> None:
    calib = write_text(tmp_path / "c.txt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result, before, after = _prune(tmp_path, "--model", str(model_dir), "--calib", str(calib),
                                   "--out", str(out))
    _assert_clean_failure(result, before, after, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unwritable_output(tmp_path: Path, model_dir: Path) -> None:
    calib = write_text(tmp_path / "c.txt")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result, before, after = _prune(tmp_path, "--model", str(model_dir), "--calib", str(calib), "--out",
                                   str(blocker / "sub" / "out"))
    _assert_clean_failure(result, before, after, "cannot write")


def test_unknown_criterion_suggests(tmp_path: Path, model_dir: Path) -> None:
    calib = write_text(tmp_path / "c.txt")
    result, before, after = _prune(tmp_path, "--model", str(model_dir), "--calib", str(calib), "--criterion",
                                   "fmss", "--out", str(tmp_path / "out"))
    _assert_clean_failure(result, before, after, "Did you mean 'fms'")


def test_cli_prune_end_to_end(tmp_path: Path, model_dir: Path) -> None:
    calib = write_text(tmp_path / "c.txt")
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", "--model", str(model_dir), "--calib", str(calib), "--ratio", "0.25",
                                 "--calib-samples", "4", "--seq-len", "16", "--spsa-steps", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "achieved" in result.output
    assert (out / "minillm.json").is_file()
    evaluated = runner.invoke(app, ["eval", str(out), "--ppl", str(calib), "--seq-len", "16"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "perplexity" in evaluated.output
