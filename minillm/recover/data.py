"""Recovery training data: plain text cut into token windows, or Alpaca instruction examples.

Sources: a local ``.txt`` (plain text), ``.jsonl`` / ``.json`` (rows with a ``text`` field, Alpaca's
``instruction`` / ``input`` / ``output``, or chat ``messages`` lists of ``{"role", "content"}``), or a
🤗 datasets name (``yahma/alpaca-cleaned``, ``wikitext2`` …). Text becomes non-overlapping windows of
``max_length`` tokens, every token a target (continued pre-training, as on WikiText). Alpaca rows become
LLM-Pruner's prompt + response, one example each, with the prompt masked out of the loss unless
``train_on_inputs``. Chat rows go through the tokenizer's own chat template, one example each, every
token a target (the model learns the whole conversation in its own format).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.calibration.data import (
    DATASET_ALIASES,
    LOCAL_SUFFIXES,
    TEXT_FIELDS,
    consecutive_windows,
    leading_bos,
    load_text,
    tokenize,
)
from minillm.errors import UsageError

IGNORE = -100
ALPACA_FIELDS = ("instruction", "input", "output")
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def _rows(source: str) -> tuple[Any, str]:
    """A datasets table for json sources / dataset names, or ``None`` with the kind ``"text"``."""
    import datasets

    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UsageError(
                f"--data {source!r} does not exist; pass a .txt/.jsonl/.json file or a dataset name"
            )
        if path.stat().st_size == 0:
            raise UsageError(f"--data {source!r} is empty (0 tokens); it needs two windows of --max-length")
        if LOCAL_SUFFIXES.get(path.suffix.lower(), "text") == "text":
            return None, "text"
        try:
            return datasets.load_dataset("json", data_files=str(path), split="train"), "json"
        except Exception as exc:  # datasets wraps JSON errors in several types
            raise UsageError(
                f"--data {source!r} is not valid JSON lines ({type(exc).__name__}); one object per "
                "line with a 'text' field or Alpaca 'instruction'/'input'/'output'"
            ) from exc
    if source in DATASET_ALIASES:
        return None, "text"
    try:
        return datasets.load_dataset(source, split="train"), "dataset"
    except Exception as exc:
        raise UsageError(
            f"could not load dataset {source!r} ({type(exc).__name__}); pass a local .txt/.jsonl file instead"
        ) from exc


def _windows(tokenizer: Any, text: str, max_length: int) -> list[Example]:
    """Consecutive windows of plain text, each led by the BOS where the tokenizer always adds one (as the
    calibration windows are: the model is trained on inputs that start the way they start in use)."""
    tokens = tokenize(tokenizer, text)
    windows = consecutive_windows(tokens, max_length, leading_bos(tokenizer))
    if windows.shape[0] < 2:
        raise UsageError(
            f"--data has {tokens.numel()} tokens and needs at least {2 * max_length} (two windows of "
            f"--max-length {max_length}); give more text or a smaller --max-length"
        )
    return [Example(w, list(w)) for w in windows.tolist()]


def _alpaca(tokenizer: Any, rows: Any, max_length: int, train_on_inputs: bool) -> list[Example]:
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    examples = []
    for row in rows:
        instruction, context, output = (str(row.get(k) or "") for k in ALPACA_FIELDS)
        template = PROMPT_WITH_INPUT if context.strip() else PROMPT_NO_INPUT
        prompt = tokenizer(
            template.format(instruction=instruction, input=context), add_special_tokens=False, verbose=False
        )["input_ids"]
        answer = tokenizer(output, add_special_tokens=False, verbose=False)["input_ids"]
        prompt = ([bos] if bos is not None else []) + prompt
        answer = answer + ([eos] if eos is not None else [])
        ids = (prompt + answer)[:max_length]
        labels = (list(prompt) if train_on_inputs else [IGNORE] * len(prompt)) + answer
        labels = labels[:max_length]
        if len(ids) >= 2 and any(t != IGNORE for t in labels[1:]):
            examples.append(Example(ids, labels))
    return examples


def _chat(tokenizer: Any, rows: Any, max_length: int) -> list[Example]:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "--data has chat 'messages' but the tokenizer has no chat template; give 'text' rows instead"
        )
    examples = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)[:max_length]
        if len(ids) >= 2:
            examples.append(Example(ids, list(ids)))
    return examples


def load_examples(
    tokenizer: Any, source: str, max_length: int, train_on_inputs: bool = False
) -> list[Example]:
    """Every training example of ``source`` (see the module docstring for the accepted layouts)."""
    rows, _ = _rows(source)
    if rows is None:
        return _windows(tokenizer, load_text(source), max_length)
    columns = set(rows.column_names)
    if {"instruction", "output"} <= columns:
        examples = _alpaca(tokenizer, rows, max_length, train_on_inputs)
    elif "messages" in columns:
        examples = _chat(tokenizer, rows, max_length)
    elif columns & set(TEXT_FIELDS):
        field = next(f for f in TEXT_FIELDS if f in columns)
        examples = _windows(tokenizer, "\n".join(str(t) for t in rows[field] if t), max_length)
    else:
        raise UsageError(
            f"--data {source!r} has fields {', '.join(sorted(columns))}; "
            "expected a 'text' field (plain text), chat 'messages', or "
            "Alpaca fields 'instruction', 'input' (optional) and 'output'"
        )
    if len(examples) < 2:
        raise UsageError(f"--data {source!r} gave {len(examples)} usable example(s); need at least 2")
    return examples


def split(examples: list[Example], val_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded hold-out of ``val_size`` examples (at most a fifth of the data) for validation perplexity."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    n_val = min(val_size, len(examples) // 5)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    longest = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
