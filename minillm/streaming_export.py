"""Export a pruned model block by block, never holding more than one block (and one shard) in memory.

Why not ``save_pretrained``: in streaming mode most weights live in accelerate's offload (``meta``
parameters + a weights map), and surgery on the live model would only change the meta shapes. So:

1. a *meta skeleton* of the model (``init_empty_weights``) receives the whole cut through the normal
   :func:`~minillm.cut.apply_cut` (:func:`minillm.cut.cut` makes it): it knows every pruned shape and the
   updated config, at no memory cost;
2. a second, dense meta skeleton is the workbench: for each decoder block, the live block is made
   resident, its weights are assigned into the workbench block, ``apply_cut`` with that block's part of
   the plan and its compensated closings cuts them (the same code as in memory, so mask ≡ surgery
   holds), the pruned tensors go to the shard writer and the workbench block returns to ``meta``;
3. huggingface_hub's ``split_torch_state_dict_into_shards`` groups the (meta) tensors into contiguous
   shards in state-dict order, at most ``max_shard_size`` and at most one (pruned) decoder block,
   because safetensors buffers a shard and copies it once while writing; each shard is filled block by
   block and written before the next is made; the index (``model.safetensors.index.json``) is the one
   ``save_pretrained`` writes, so vanilla ``from_pretrained`` loads the folder.

Hidden size and depth (issue 17) go the same way: the export's block ``j`` is the source block
``kept_layers[j]``; each block's hidden part is cut by :func:`~minillm.surgery_hidden.slice_block_hidden`
on the workbench, and each other unit (embedding, final norm, untied head) by
:func:`~minillm.surgery_hidden.slice_outer_hidden` on a fresh meta skeleton holding only that unit's
weights (Gemma's normaliser factor depends on the config, not on the other units' values).

Tied weights are dropped exactly as transformers does (``remove_tied_weights_from_state_dict``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.blocks import resident
from minillm.cut import apply_cut, meta_skeleton
from minillm.output_guard import METADATA_FILE, atomic_output_dir
from minillm.plan import PrunePlan
from minillm.remote_code import add_remote_code
from minillm.surgery_hidden import slice_block_hidden, slice_outer_hidden

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _sub_plan(plan: PrunePlan, index: int) -> PrunePlan:
    """Block ``index``'s part of ``plan`` (no layers when the plan leaves it whole)."""
    return PrunePlan(
        head_mode=plan.head_mode,
        allocation=plan.allocation,
        layers=[p for p in plan.layers if p.index == index],
        params_before=plan.params_before,
        params_after=plan.params_after,
        target_ratio=plan.target_ratio,
    )


def _owner(names: list[str], key: str) -> str:
    """The longest module name that prefixes ``key`` (``""`` for the root)."""
    best = ""
    for name in names:
        if name and key.startswith(name + ".") and len(name) > len(best):
            best = name
    return best


class _Producer:
    """Pruned tensors on CPU, one unit (decoder block or other module) resident at a time."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
                 updates: dict[int, dict[str, Any]] | None = None,
                 bias_families: dict[str, str] | None = None) -> None:
        self.model, self.adapter, self.plan = model, adapter, plan
        self.updates = updates or {}
        self.bias_families = bias_families or {}
        self.workbench = meta_skeleton(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.layers = adapter.decoder_layers(model)
        #: export block name (the source's name at that position) → source block index
        kept = plan.kept_layers if plan.kept_layers is not None else range(len(self.layers))
        self.blocks = {names[id(self.layers[j])]: source for j, source in enumerate(kept)}
        self.hidden_index = (None if plan.hidden is None
                             else torch.tensor(sorted(plan.hidden), dtype=torch.long))
        self.unit_names = list(names.values())
        self.current: tuple[str, dict[str, torch.Tensor]] | None = None

    def unit_of(self, key: str) -> str:
        for prefix in self.blocks:
            if key.startswith(prefix + "."):
                return prefix
        return _owner(self.unit_names, key)

    def get(self, key: str) -> torch.Tensor:
        unit = self.unit_of(key)
        if self.current is None or self.current[0] != unit:
            self.current = None  # drop the previous unit before loading the next
            self.current = (unit, self._load(unit))
        return self.current[1].pop(key)

    @torch.no_grad()
    def _load(self, unit: str) -> dict[str, torch.Tensor]:
        live = self.model.get_submodule(unit) if unit else self.model
        prefix = f"{unit}." if unit else ""
        if unit not in self.blocks:
            with resident(live):
                tensors = {
                    **dict(live.named_parameters(recurse=False)),
                    **dict(live.named_buffers(recurse=False)),
                }
                tensors = {k: v.detach().to("cpu") for k, v in tensors.items()}
            if self.hidden_index is not None:
                tensors = self._outer_hidden(unit, tensors)
            return {prefix + k: v for k, v in tensors.items()}
        index = self.blocks[unit]
        live = self.layers[index]
        bench = self.adapter.decoder_layers(self.workbench)[index]
        with resident(live):
            state = {k: v.detach().to("cpu") for k, v in live.state_dict().items()}
        bench.load_state_dict(state, assign=True)  # no copy: slicing below makes new tensors
        del state
        # the cut of minillm.cut, on this block: compensated closings, biases (every block), slicing
        apply_cut(self.workbench, self.adapter, _sub_plan(self.plan, index), self.updates, self.bias_families,
                  layers=[index])
        if self.hidden_index is not None:
            slice_block_hidden(bench, self.adapter, self.hidden_index, int(self.model.config.hidden_size))
        result = {prefix + k: v.contiguous() for k, v in bench.state_dict().items()}
        bench.to("meta")
        return result

    def _outer_hidden(self, unit: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One non-block unit's tensors after the hidden cut: put into a fresh meta skeleton (ties kept),
        cut there with every other unit still weightless, read back."""
        fresh = meta_skeleton(self.model)
        module = fresh.get_submodule(unit) if unit else fresh
        embedding, head = fresh.get_input_embeddings(), fresh.get_output_embeddings()
        tied = head is not None and head.weight is embedding.weight
        module.load_state_dict(tensors, assign=True, strict=False)
        if tied:
            head.weight = embedding.weight
        slice_outer_hidden(fresh, self.adapter, self.hidden_index)
        return {k: v.detach().contiguous() for k, v in (*module.named_parameters(recurse=False),
                                                       *module.named_buffers(recurse=False))}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_shards(state: dict[str, torch.Tensor], produce: Any, folder: Path, max_shard_bytes: int) -> None:
    """Shards of ``state``'s (meta) tensors as huggingface_hub groups them (contiguous, in key order),
    each filled from ``produce(key)`` and written before the next is made; the index when sharded."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes,
                                               filename_pattern=WEIGHTS_NAME.replace(".safetensors",
                                                                                     "{suffix}.safetensors"))
    for name, keys in split.filename_to_tensors.items():
        shard = {key: produce(key) for key in keys}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pruned_streaming(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchAdapter,
    plan: PrunePlan,
    out: str | Path,
    metadata: dict,
    card: str,
    *,
    skeleton: nn.Module,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    updates: dict[int, dict[str, Any]] | None = None,
    force: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Apply ``plan`` block by block and write the export atomically (same files as :func:`save_pruned`).

    ``skeleton`` is the cut meta skeleton (:func:`minillm.cut.cut`: final shapes and config, no weights);
    ``updates`` the compensated closing projections the blocks receive before they are sliced."""
    from accelerate.utils import convert_file_size_to_int
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    max_bytes = (
        convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    )
    with atomic_output_dir(out, overwrite, force, inputs) as tmp:
        config = skeleton.config
        metadata = add_remote_code(skeleton, adapter, tmp, metadata)
        state = remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton)
        # a shard is buffered (and copied once by safetensors) before it is written: keep it to one block
        first_block = adapter.decoder_layers(skeleton)[0]
        max_bytes = min(max_bytes, max(sum(_nbytes(t) for t in first_block.state_dict().values()), 1))
        flags = adapter.bias_config_flags(model.config).items()
        families = {
            f: flag for f, flag in flags if getattr(config, flag, False) != getattr(model.config, flag, False)
        }
        producer = _Producer(model, adapter, plan, updates, families)
        _write_shards(state, producer.get, tmp, max_bytes)
        config.dtype = model.dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str))
        (tmp / "README.md").write_text(card)
    return Path(out)
