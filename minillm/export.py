"""The export stage: safetensors, config, tokenizer, ``minillm.json`` and a model card, written atomically.

:func:`export` is the one entry: it picks the writer from where the weights live — a resident pruned
model is written by ``save_pretrained`` (:func:`save_pruned`); an offloaded one is cut and written block
by block by the shard writer (:mod:`minillm.streaming_export`), never holding more than one block.
Everything is written to a temporary folder beside ``out`` and renamed into place at the end, so a
failure never leaves a half-written checkpoint. Widths a stock config cannot express get a generated
``modeling_minillm.py`` (:mod:`minillm.remote_code`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.output_guard import METADATA_FILE, atomic_output_dir, check_output_dir
from minillm.remote_code import REMOTE_CODE_FILE, add_remote_code, needs_remote_code

if TYPE_CHECKING:
    from minillm.cut import CutResult

__all__ = ["METADATA_FILE", "REMOTE_CODE_FILE", "atomic_output_dir", "check_output_dir", "export",
           "needs_remote_code", "read_metadata", "save_pruned"]


def export(source: nn.Module, cut: CutResult, tokenizer: Any, adapter: ArchAdapter, out: str | Path,
           metadata: dict, card: str, *, overwrite: bool = False, max_shard_size: str | int = "5GB",
           force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Write the cut model to ``out``: ``save_pretrained`` when it is resident, the block-by-block shard
    writer when its weights are offloaded (``source`` is the dense model the shard writer reads)."""
    if cut.offloaded:
        from minillm.streaming_export import save_pruned_streaming

        return save_pruned_streaming(source, tokenizer, adapter, cut.plan, out, metadata, card,
                                     overwrite=overwrite, max_shard_size=max_shard_size, skeleton=cut.model,
                                     updates=cut.updates, force=force, inputs=tuple(inputs))
    return save_pruned(cut.model, tokenizer, adapter, out, metadata, card, overwrite=overwrite,
                       max_shard_size=max_shard_size, force=force, inputs=inputs)


def save_pruned(model: nn.Module, tokenizer: Any, adapter: ArchAdapter, out: str | Path, metadata: dict,
                card: str, overwrite: bool = False, max_shard_size: str | int = "5GB",
                extra_files: Callable[[Path], None] | None = None, force: bool = False,
                inputs: Iterable[str | Path] = ()) -> Path:
    """Write the export atomically (rules of :mod:`minillm.output_guard`); returns the final folder."""
    with atomic_output_dir(out, overwrite, force, inputs) as tmp:
        metadata = add_remote_code(model, adapter, tmp, metadata)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str))
        (tmp / "README.md").write_text(card)
        if extra_files is not None:
            extra_files(tmp)
    return Path(out)


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """``minillm.json`` of an export ({} when the folder is not an export); a corrupt one is an error."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    from minillm.loading import read_json_mapping

    return read_json_mapping(path, "re-export the model or remove the file")
