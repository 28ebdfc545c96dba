"""Save and load LSTM LMs as safetensors + JSON config + vocabulary, atomically.

Why not ``torch.save``: a pickled module cannot be rebuilt without this exact code and hides what was
pruned. A saved folder holds

* ``model.safetensors`` — the plain tensors (a tied decoder is stored once, as the embedding);
* ``config.json`` — ``{"format": "minillm-lstm-lm", "model": LstmLmConfig}``, enough to rebuild the
  (pruned, uneven-width) model with :func:`load_model`;
* ``vocab.txt`` — one word a line, line number = token id;
* optional JSON side files (``prune_plan.json``, ``dst_report.json``, ``metrics.json``).

The folder is written under a temporary name next to the target and renamed into place at the end, so
a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minillm.lstm.data import Vocab
from minillm.lstm.model import LstmLm, LstmLmConfig

FORMAT = "minillm-lstm-lm"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.txt"


class ModelFileError(ValueError):
    """A model folder that is missing, incomplete, or not an LSTM LM saved by minillm."""


@dataclass
class LoadedModel:
    model: LstmLm
    vocab: Vocab
    side_files: dict[str, Any] = field(default_factory=dict)


def check_output_dir(out_dir: Path, overwrite: bool, inputs: tuple[Path | str, ...] = ()) -> None:
    """Fail early (before any work) when the output folder exists and may not be replaced: never an
    input, the current or home directory, nor (even with ``overwrite``) a folder that is not an export."""
    from minillm.output_guard import check_no_overlap

    out_dir = Path(out_dir)
    check_no_overlap(out_dir, inputs)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out_dir)!r} already exists (pass --overwrite to replace)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / CONFIG).is_file():
        raise FileExistsError(f"output folder {str(out_dir)!r} is not a minillm LSTM export; "
                              "--overwrite replaces only exports: choose another folder")


def _state_dict(model: LstmLm) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("decoder.weight")
    unexpected = [k for k in state if "threshold" in k]
    if unexpected:
        raise ValueError("the model still has DST-masked layers; call minillm.lstm.dst.densify first")
    return state


def save_model(
    model: LstmLm,
    vocab: Vocab,
    out_dir: Path,
    side_files: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` + ``vocab`` (+ JSON side files) to ``out_dir`` atomically; returns ``out_dir``."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} words, model expects {model.config.vocab_size}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(_state_dict(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
        (tmp / CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        vocab.save(tmp / VOCAB)
        for name, content in (side_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        if out_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, backup / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_model(model_dir: Path) -> LoadedModel:
    """Rebuild the model saved in ``model_dir`` (pruned widths included) with its vocabulary."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"model folder {str(model_dir)!r} does not exist")
    for required in (WEIGHTS, CONFIG, VOCAB):
        if not (model_dir / required).is_file():
            raise ModelFileError(f"model folder {str(model_dir)!r} has no {required}")
    try:
        meta = json.loads((model_dir / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{CONFIG} in {str(model_dir)!r} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        raise ModelFileError(f"{str(model_dir)!r} is not a minillm LSTM model (format {found!r})")
    try:
        config = LstmLmConfig.from_dict(meta["model"])
        vocab = Vocab.load(model_dir / VOCAB)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"bad model config or vocabulary in {str(model_dir)!r}: {exc}") from exc
    if len(vocab) != config.vocab_size:
        raise ModelFileError(f"vocab.txt has {len(vocab)} words but the config says {config.vocab_size}")
    state = load_file(str(model_dir / WEIGHTS))
    if config.tie_weights:
        state["decoder.weight"] = state["embedding.weight"]
    model = LstmLm(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelFileError(f"weights in {str(model_dir)!r} do not match config.json: {first}") from exc
    model.eval()
    side = {}
    for path in sorted(model_dir.glob("*.json")):
        if path.name != CONFIG:
            side[path.name] = json.loads(path.read_text(encoding="utf-8"))
    return LoadedModel(model=model, vocab=vocab, side_files=side)
