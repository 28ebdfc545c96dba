"""Corpus, model, training loop and export of the LSTM LM, on tiny synthetic data under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minillm.lstm import export
from minillm.lstm.data import EOS, UNK, Corpus, CorpusError, Vocab, batchify, bptt_windows, count_windows
from minillm.lstm.export import ModelFileError, load_model, save_model
from minillm.lstm.model import LstmLm, LstmLmConfig, count_parameters
from minillm.lstm.train import TrainConfig, evaluate_nll, train_lm


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_corpus(folder: Path, seed: int = 0) -> Path:
    """A learnable toy language: counting sequences over 20 words, with a few rare words."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 300), ("valid", 40), ("test", 40)):
        rows = []
        for _ in range(lines):
            start, length = rng.randrange(20), rng.randrange(3, 9)
            rows.append(" " + " ".join(f"w{(start + k) % 20}" for k in range(length)) + " ")
        if split == "test":
            rows.append(" w1 neverseen w2 ")
        (folder / f"toy.{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_vocab_and_encoding(tmp_path: Path) -> None:
    corpus = Corpus.load(write_corpus(tmp_path / "c"))
    vocab = corpus.vocab
    assert vocab.words[:2] == (EOS, UNK) and len(vocab) == 22
    ids = vocab.encode(["w1 neverseen w2", "", "w3"])
    index = vocab.index
    assert ids.tolist() == [index["w1"], index[UNK], index["w2"], index[EOS], index["w3"], index[EOS]]
    assert int((corpus.test == index[UNK]).sum()) == 1
    vocab.save(tmp_path / "v.txt")
    assert Vocab.load(tmp_path / "v.txt") == vocab


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus.load(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.train.txt").write_text("a b\n")
    with pytest.raises(CorpusError, match=r"valid\.txt"):
        Corpus.load(tmp_path / "x")


def test_batchify_and_windows_cover_the_stream() -> None:
    ids = torch.arange(103)
    source = batchify(ids, 4)
    assert source.shape == (25, 4)
    assert source[:, 1].tolist() == list(range(25, 50))  # contiguous columns
    windows = list(bptt_windows(source, 7))
    assert len(windows) == count_windows(source, 7) == 4
    inputs = torch.cat([w[0] for w in windows])
    targets = torch.cat([w[1] for w in windows])
    assert torch.equal(inputs, source[:-1]) and torch.equal(targets, source[1:])


def test_config_validation_and_round_trip() -> None:
    config = LstmLmConfig(vocab_size=10, embed_size=6, hidden_sizes=(4, 6), tie_weights=True)
    assert LstmLmConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="tie_weights"):
        LstmLmConfig(vocab_size=10, embed_size=5, hidden_sizes=(4, 6), tie_weights=True)
    with pytest.raises(ValueError, match="unknown"):
        LstmLmConfig.from_dict({"vocab_size": 10, "bogus": 1})


def test_initialisation_is_reproducible_from_a_generator() -> None:
    config = LstmLmConfig(vocab_size=12, embed_size=4, hidden_sizes=(5,))
    a = LstmLm(config, torch.Generator().manual_seed(3))
    b = LstmLm(config, torch.Generator().manual_seed(3))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    tied = LstmLm(LstmLmConfig(vocab_size=12, embed_size=5, hidden_sizes=(5,), tie_weights=True))
    assert tied.decoder.weight is tied.embedding.weight
    assert count_parameters(tied) == 12 * 5 + 4 * 5 * (5 + 5) + 8 * 5 + 12


def test_training_learns_and_is_deterministic(tmp_path: Path) -> None:
    corpus = Corpus.load(write_corpus(tmp_path / "c"))
    config = LstmLmConfig(vocab_size=len(corpus.vocab), embed_size=12, hidden_sizes=(16, 16), dropout=0.1)
    train_config = TrainConfig(epochs=4, lr=2e-2, batch_size=4, bptt=10, seed=1)
    losses = []
    models = []
    for _ in range(2):
        model = LstmLm(config, torch.Generator().manual_seed(0))
        before = evaluate_nll(model, corpus.valid, batch_size=4, bptt=10)
        result = train_lm(model, corpus.train, train_config)
        losses.append((before, evaluate_nll(model, corpus.valid, batch_size=4, bptt=10), result.final_loss))
        models.append(model)
    (before, after, final), (_, after2, final2) = losses
    assert after < 0.6 * before  # the counting language is easy: far below the uniform ≈ log 22
    assert after == after2 and final == final2  # same seeds ⇒ same run
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip(tmp_path: Path, tie: bool) -> None:
    vocab = Vocab.build(["a b c d e"])
    config = LstmLmConfig(vocab_size=len(vocab), embed_size=6, hidden_sizes=(5, 6), dropout=0.0,
                          tie_weights=tie)
    model = LstmLm(config, torch.Generator().manual_seed(0)).eval()
    save_model(model, vocab, tmp_path / "m", {"metrics.json": {"x": 1}})
    loaded = load_model(tmp_path / "m")
    assert loaded.vocab == vocab and loaded.model.config == config
    assert loaded.side_files == {"metrics.json": {"x": 1}}
    ids = torch.randint(len(vocab), (4, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0], rtol=0, atol=0)
    if tie:
        assert loaded.model.decoder.weight is loaded.model.embedding.weight
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_model(model, vocab, tmp_path / "m")
    save_model(model, vocab, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = Vocab.build(["a b"])
    model = LstmLm(LstmLmConfig(vocab_size=len(vocab), embed_size=3, hidden_sizes=(4,)))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, vocab, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_one_clear_line(tmp_path: Path) -> None:
    vocab = Vocab.build(["a b"])
    model = LstmLm(LstmLmConfig(vocab_size=len(vocab), embed_size=3, hidden_sizes=(4,)))
    save_model(model, vocab, tmp_path / "m")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model"]["hidden_sizes"] = [5]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(tmp_path / "m")


def test_inference_speed_times_both_parts() -> None:
    from minillm.lstm.speed import inference_speed, median_seconds

    config = LstmLmConfig(vocab_size=20, embed_size=4, hidden_sizes=(6, 5))
    model = LstmLm(config, torch.Generator().manual_seed(0))
    result = inference_speed(model, batch_size=2, seq_len=5, repeats=3, clock="thread")
    assert result.lm_ms > 0 and result.lstm_ms > 0 and result.lm_tokens_per_s > 0
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="unknown clock"):
        median_seconds(lambda: None, clock="sundial")
