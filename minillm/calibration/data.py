"""Calibration and evaluation text, read through 🤗 datasets, tokenised, cut into fixed-length windows.

A source is a local ``.txt`` / ``.jsonl`` / ``.json`` file or a dataset alias (``wikitext2``, ``c4``,
``ptb``) or any ``datasets`` name (``name`` or ``name:config``). Calibration takes ``n`` windows of
``seq_len`` tokens at seeded random offsets of the concatenated text (the Wanda / LLM-Pruner recipe), each
led by the BOS where the tokenizer always adds one;
perplexity uses every non-overlapping window in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.errors import UsageError

#: alias -> (path, config name, split, text field, data_files)
DATASET_ALIASES: dict[str, tuple[str, str | None, str, str, str | None]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text", None),
    "wikitext2-test": ("wikitext", "wikitext-2-raw-v1", "test", "text", None),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence", None),
    "ptb-test": ("ptb_text_only", "penn_treebank", "test", "sentence", None),
    "c4": ("allenai/c4", None, "train", "text", "en/c4-train.00000-of-01024.json.gz"),
    "c4-validation": ("allenai/c4", None, "validation", "text", "en/c4-validation.00000-of-00008.json.gz"),
}
TEXT_FIELDS = ("text", "content", "sentence")
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json"}


def _rows_to_text(rows: Any, source: str) -> str:
    columns = list(rows.column_names)
    field = next((f for f in TEXT_FIELDS if f in columns), None)
    if field is None:
        if {"instruction", "output"} <= set(columns):
            parts = [
                "\n".join(x for x in (r["instruction"], r.get("input") or "", r["output"]) if x) for r in rows
            ]
            return "\n\n".join(parts)
        raise UsageError(
            f"{source}: no text field found (columns: {', '.join(columns)}); expected one of "
            f"{', '.join(TEXT_FIELDS)} or Alpaca-style instruction/input/output"
        )
    return "\n".join(str(t) for t in rows[field])


def _check_local_file(path: Path, builder: str, source: str) -> None:
    """UTF-8 text, and (for JSON) parseable, checked here so the error names the file and the line."""
    import json

    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source!r} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); "
                         "give a plain-text .txt, .jsonl or .json file") from None
    if "\x00" in text:
        raise UsageError(f"{source!r} looks binary (it contains NUL bytes); give a plain-text file")
    if builder != "json":
        return
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return
        except ValueError:
            pass  # JSON Lines under a .json name: datasets reads those too
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{source!r} line {number} is not valid JSON ({exc}); "
                             "write one JSON object per line, e.g. {\"text\": \"...\"}") from None


def load_text(source: str, max_chars: int | None = None) -> str:
    """Read a local file or dataset into one string (``max_chars`` bounds huge corpora such as C4)."""
    import datasets

    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UsageError(f"calibration/evaluation file {source!r} does not exist; "
                             "pass a .txt/.jsonl/.json file or a dataset name "
                             f"({', '.join(DATASET_ALIASES)})")
        if path.stat().st_size == 0:
            raise UsageError(f"calibration/evaluation file {source!r} is empty")
        builder = LOCAL_SUFFIXES.get(path.suffix.lower(), "text")
        _check_local_file(path, builder, source)
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # datasets wraps parse errors in its own types
            raise UsageError(f"cannot read {source!r} as {builder} ({type(exc).__name__}); "
                             "give UTF-8 text, or one JSON object per line with a \"text\" field") from exc
    else:
        name, config, split, _, data_files = DATASET_ALIASES.get(
            source, (source.split(":")[0], [*source.split(":"), None][1], "train", "text", None)
        )
        try:
            rows = datasets.load_dataset(name, config, split=split, data_files=data_files)
        except Exception as exc:  # datasets raises many types for "not reachable / not found"
            raise UsageError(f"could not load dataset {source!r} ({type(exc).__name__}: {exc}); "
                             "pass a local .txt/.jsonl/.json file instead") from exc
    if max_chars is not None and len(rows) > 1:
        rows = _take_until(rows, max_chars)
    text = _rows_to_text(rows, source)
    if not text.strip():
        raise UsageError(f"{source!r} contains no text")
    return text


def _take_until(rows: Any, max_chars: int) -> Any:
    total, count = 0, 0
    field = next((f for f in TEXT_FIELDS if f in rows.column_names), None)
    if field is None:
        return rows
    for value in rows[field]:
        total += len(str(value))
        count += 1
        if total >= max_chars:
            break
    return rows.select(range(count))


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one token stream (long texts are fine: no model-length truncation)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids


@dataclass(frozen=True)
class CalibrationSet:
    """``input_ids`` of shape (n, seq_len), consumed in micro-batches of ``batch_size``."""

    input_ids: torch.Tensor
    batch_size: int = 8

    def batches(self) -> list[torch.Tensor]:
        return list(self.input_ids.split(self.batch_size))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts it in front of every text it encodes (Gemma, Llama 2/3, Mistral),
    else None (GPT-2-style tokenizers such as SmolLM2's, whose ``bos_token`` is never added)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if list(ids[:1]) == [bos] else None


def sample_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int,
                   what: str = "calibration text", bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of a :func:`tokenize` stream at seeded random offsets (``what``:
    the text errors name).

    ``bos``: every window is that token followed by ``seq_len − 1`` tokens of the text (the stream's own
    leading BOS dropped) — how a model whose tokenizer adds a BOS always sees its inputs. Such models keep
    their attention sink on the BOS; a window without it makes its first token a stand-in sink with
    activations the model never has in use (Gemma's perplexity is 2–3 × worse without BOS), and the
    statistics scoring and compensation gather from the windows would describe those."""
    if n < 1 or seq_len < 2:
        raise UsageError("--calib-samples must be >= 1 and --seq-len >= 2")
    if bos is not None:
        tokens = tokens[1:]
    if tokens.numel() <= seq_len:
        raise UsageError(f"{what} has {tokens.numel()} tokens, fewer than --seq-len {seq_len}; "
                         "give more text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    body = seq_len if bos is None else seq_len - 1
    starts = torch.randint(0, tokens.numel() - body, (n,), generator=generator)
    return _led_by(torch.stack([tokens[s : s + body] for s in starts.tolist()]), bos)


def calibration_set(tokenizer: Any, source: str, n: int = 32, seq_len: int = 128, seed: int = 0,
                    batch_size: int = 8, what: str = "calibration text") -> CalibrationSet:
    """Load, tokenise and sample the calibration windows in one call (also ``--search-data``'s); each
    window starts with the BOS where the tokenizer always adds one (:func:`leading_bos`)."""
    text = load_text(source, max_chars=max(n * seq_len * 40, 2_000_000))
    windows = sample_windows(tokenize(tokenizer, text), n, seq_len, seed, what, leading_bos(tokenizer))
    return CalibrationSet(windows, batch_size)


def evaluation_windows(tokenizer: Any, source: str, seq_len: int,
                       bos_per_window: bool = False) -> torch.Tensor:
    """Every non-overlapping window of ``seq_len`` tokens, in order (a trailing partial window is dropped).

    By default the text is one stream with one leading BOS (the GPTQ / SparseGPT protocol the pruning
    papers report); ``bos_per_window``: every window is the BOS + ``seq_len − 1`` tokens of the text
    (lm-eval's convention of a prefix token per window), which models trained with a BOS at every start
    need to be measured as they are used — Gemma's perplexity is 2–3 × worse without it."""
    tokens = tokenize(tokenizer, load_text(source))
    bos = None
    if bos_per_window:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UsageError("--ppl-bos window needs a tokenizer with a BOS token and this one has none; "
                             "use --ppl-bos stream")
    windows = consecutive_windows(tokens, seq_len, bos)
    if windows.shape[0] == 0:
        raise UsageError(f"{source!r} has fewer tokens ({tokens.numel()}) than --seq-len {seq_len}")
    return windows


def consecutive_windows(tokens: torch.Tensor, seq_len: int, bos: int | None = None) -> torch.Tensor:
    """A :func:`tokenize` stream cut into consecutive windows of ``seq_len`` tokens (a trailing partial
    window dropped; possibly none). ``bos``: each window is that token + ``seq_len − 1`` tokens of the
    text instead, the stream's own leading BOS dropped."""
    if bos is not None:
        tokens, seq_len = tokens[1:], seq_len - 1
    count = tokens.numel() // seq_len
    return _led_by(tokens[: count * seq_len].view(count, seq_len), bos)


def _led_by(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` with a column of ``bos`` in front (unchanged when ``bos`` is None)."""
    if bos is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), bos), windows], dim=1)
