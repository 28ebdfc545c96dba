"""PTB-format word corpora for the LSTM language model: vocabulary, token ids, BPTT batches.

Why this shape: a PTB-style corpus is already tokenised (one sentence a line, rare words replaced by
``<unk>``), so the only preprocessing is ``split()`` plus an ``<eos>`` per line. The vocabulary is built
from the training split alone and travels with every saved model (``vocab.txt``), so a pruned model
evaluated later maps words to exactly the ids it was trained on; words it has never seen become
``<unk>``.

A corpus folder holds three files whose names end in ``train.txt``, ``valid.txt`` and ``test.txt``
(``ptb.train.txt``, ``wiki.train.txt`` and plain ``train.txt`` all qualify).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")


class CorpusError(ValueError):
    """A corpus folder or file that cannot be read as a PTB-style corpus."""


@dataclass(frozen=True)
class Vocab:
    """Word ↔ id map. Ids are stable: ``<eos>`` and ``<unk>`` first, then words by descending count."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words):
            raise CorpusError("vocabulary contains duplicate words")
        if UNK not in self.words or EOS not in self.words:
            raise CorpusError(f"vocabulary must contain {EOS!r} and {UNK!r}")

    @property
    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, lines: Iterable[str]) -> Vocab:
        counts = Counter(word for line in lines for word in line.split())
        counts.pop(EOS, None)
        counts.pop(UNK, None)
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(words=(EOS, UNK, *ordered))

    def encode(self, lines: Iterable[str]) -> torch.Tensor:
        """Token ids of ``lines`` with ``<eos>`` after each line, unknown words mapped to ``<unk>``."""
        index = self.index
        unk, eos = index[UNK], index[EOS]
        ids: list[int] = []
        for line in lines:
            words = line.split()
            if not words:
                continue
            ids.extend(index.get(w, unk) for w in words)
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.words) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls(words=tuple(path.read_text(encoding="utf-8").split("\n")[:-1]))


def find_split_files(folder: Path) -> dict[str, Path]:
    """The train/valid/test files of a corpus folder, with a one-line error when one is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorpusError(f"corpus folder {str(folder)!r} does not exist")
    found: dict[str, Path] = {}
    for split in SPLITS:
        matches = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(f"{split}.txt"))
        if len(matches) != 1:
            what = "no file" if not matches else f"{len(matches)} files"
            raise CorpusError(f"corpus folder {str(folder)!r} has {what} ending in '{split}.txt'")
        found[split] = matches[0]
    return found


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{str(path)!r} is not UTF-8 text") from exc


@dataclass
class Corpus:
    """Token ids of the three splits and the vocabulary they were encoded with."""

    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise CorpusError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    @classmethod
    def load(cls, folder: Path, vocab: Vocab | None = None) -> Corpus:
        """Read a corpus folder; build the vocabulary from train unless one is given."""
        files = find_split_files(folder)
        lines = {split: read_lines(path) for split, path in files.items()}
        if vocab is None:
            vocab = Vocab.build(lines["train"])
        ids = {split: vocab.encode(text) for split, text in lines.items()}
        for split, tensor in ids.items():
            if tensor.numel() < 2:
                raise CorpusError(f"split {split!r} of {str(folder)!r} holds fewer than two tokens")
        return cls(vocab=vocab, **ids)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` contiguous columns, shape (T, B); the tail is dropped."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    steps = ids.numel() // batch_size
    if steps < 2:
        raise CorpusError(f"{ids.numel()} tokens are too few for batch size {batch_size}")
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_windows(source: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (input, target) windows of at most ``bptt`` steps over a batchified stream."""
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    for start in range(0, source.size(0) - 1, bptt):
        length = min(bptt, source.size(0) - 1 - start)
        yield source[start : start + length], source[start + 1 : start + 1 + length]


def count_windows(source: torch.Tensor, bptt: int) -> int:
    return (source.size(0) - 1 + bptt - 1) // bptt


def head(windows: Sequence[tuple[torch.Tensor, torch.Tensor]] | Iterator, n: int) -> list:
    """The first ``n`` windows as a list (calibration sets are small and reused many times)."""
    out = []
    for i, window in enumerate(windows):
        if i >= n:
            break
        out.append(window)
    return out
