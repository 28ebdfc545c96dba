"""Where windows get their BOS.

Calibration windows start with the BOS exactly where the tokenizer always adds one: models whose
tokenizer adds a BOS (Gemma, Llama 2/3, Mistral) keep their attention sink on it, so the statistics
gathered on calibration windows must come from windows that start the way the model's inputs do;
GPT-2-style tokenizers (SmolLM2's) never add their ``bos_token`` and keep plain windows; recovery's
plain-text windows follow the same rule. Perplexity windows keep one BOS per stream unless
``minillm eval --ppl-bos window`` asks for one per window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model, tiny_tokenizer, write_text
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from minillm.calibration.data import (
    calibration_set,
    evaluation_windows,
    leading_bos,
    sample_windows,
    tokenize,
)
from minillm.cli import app, register_commands
from minillm.errors import UsageError


def bos_adding_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer with a Llama-style post-processor that prepends ``<s>``."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def test_leading_bos_follows_what_the_tokenizer_adds() -> None:
    assert leading_bos(bos_adding_tokenizer()) == 1
    assert leading_bos(tiny_tokenizer()) is None  # has a bos_token, never adds it


def test_windows_start_with_the_bos_and_continue_the_text(tmp_path: Path) -> None:
    text = write_text(tmp_path / "calib.txt")
    tokenizer = bos_adding_tokenizer()
    windows = calibration_set(tokenizer, str(text), n=6, seq_len=16, seed=3).input_ids
    assert windows.shape == (6, 16)
    assert (windows[:, 0] == 1).all()
    stream = tokenize(tokenizer, text.read_text())[1:]  # the text without its leading BOS
    assert not (stream == 1).any()
    for window in windows:  # every body is a contiguous run of the text
        body = window[1:]
        starts = (stream.unfold(0, 15, 1) == body).all(dim=1)
        assert starts.any()
    # the same seed gives the same windows
    assert torch.equal(windows, calibration_set(tokenizer, str(text), n=6, seq_len=16, seed=3).input_ids)


def test_tokenizers_without_a_leading_bos_keep_plain_windows(tmp_path: Path) -> None:
    text = write_text(tmp_path / "calib.txt")
    tokenizer = tiny_tokenizer()
    windows = calibration_set(tokenizer, str(text), n=6, seq_len=16, seed=3).input_ids
    expected = sample_windows(tokenize(tokenizer, text.read_text()), 6, 16, 3)
    assert torch.equal(windows, expected)
    assert not (windows[:, 0] == tokenizer.bos_token_id).all()


def test_perplexity_windows_keep_one_bos_per_stream_by_default(tmp_path: Path) -> None:
    text = write_text(tmp_path / "test.txt")
    tokenizer = bos_adding_tokenizer()
    stream = tokenize(tokenizer, text.read_text())
    windows = evaluation_windows(tokenizer, str(text), 16)
    count = stream.numel() // 16
    assert torch.equal(windows, stream[: count * 16].view(count, 16))
    assert int(windows[0, 0]) == 1 and not (windows[1:, 0] == 1).any()


def test_perplexity_windows_with_a_bos_in_front_of_each(tmp_path: Path) -> None:
    text = write_text(tmp_path / "test.txt")
    tokenizer = bos_adding_tokenizer()
    body = tokenize(tokenizer, text.read_text())[1:]
    windows = evaluation_windows(tokenizer, str(text), 16, bos_per_window=True)
    count = body.numel() // 15
    assert windows.shape == (count, 16)
    assert (windows[:, 0] == 1).all()
    assert torch.equal(windows[:, 1:], body[: count * 15].view(count, 15))  # the text, in order, once


def test_bos_per_window_needs_a_bos_token(tmp_path: Path) -> None:
    text = write_text(tmp_path / "test.txt")
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = None
    with pytest.raises(UsageError, match="--ppl-bos stream"):
        evaluation_windows(tokenizer, str(text), 16, bos_per_window=True)


def test_eval_cli_ppl_bos(tmp_path: Path) -> None:
    import json

    register_commands()
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = write_text(tmp_path / "test.txt")
    runner = CliRunner()
    report = tmp_path / "eval.json"
    done = runner.invoke(app, ["eval", str(folder), "--ppl", str(text), "--seq-len", "16",
                               "--ppl-bos", "window", "--json", str(report)])
    assert done.exit_code == 0, done.output
    perplexity = json.loads(report.read_text())["perplexity"]
    assert perplexity["bos_per_window"] is True
    assert "the BOS + 15 tokens" in perplexity["protocol"]
    refused = runner.invoke(app, ["eval", str(folder), "--ppl", str(text), "--ppl-bos", "each"])
    assert refused.exit_code != 0
    assert "--ppl-bos must be one of stream, window" in refused.output


def test_recovery_text_windows_are_led_like_calibration_windows(tmp_path: Path) -> None:
    from minillm.recover.data import load_examples

    text = write_text(tmp_path / "train.txt")
    led = load_examples(bos_adding_tokenizer(), str(text), max_length=16)
    body = tokenize(bos_adding_tokenizer(), text.read_text())[1:]
    assert len(led) == body.numel() // 15
    assert all(e.input_ids[0] == 1 and len(e.input_ids) == 16 for e in led)
    assert [t for e in led for t in e.input_ids[1:]] == body[: len(led) * 15].tolist()
    plain = load_examples(tiny_tokenizer(), str(text), max_length=16)  # no leading BOS: one stream, as before
    stream = tokenize(tiny_tokenizer(), text.read_text())
    assert [t for e in plain for t in e.input_ids] == stream[: len(plain) * 16].tolist()
