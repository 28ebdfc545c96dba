"""``recover``: what ``minillm recover`` does, top to bottom: load → data → LoRA → train → merge → export."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import minillm
from minillm.errors import UsageError
from minillm.recover.config import RecoverConfig
from minillm.recover.train import (
    LogCallback,
    StepCallback,
    TrainLog,
    attach_lora,
    lora_targets,
    require_peft,
    train,
)


@dataclass
class RecoverResult:
    model: nn.Module
    log: TrainLog
    out: Path | None
    metadata: dict[str, Any] = field(default_factory=dict)


def default_checkpoint_dir(out: str | Path) -> Path:
    """Checkpoints live beside the export (the export itself is only written, atomically, at the end)."""
    path = Path(out)
    return path.with_name(f"{path.name}.checkpoints")


def _remove_checkpoints(folder: Path) -> None:
    """Delete the ``step-*`` checkpoints this command writes, and the folder if nothing else is in it."""
    import shutil

    if not folder.is_dir() or folder.is_symlink():
        return
    for step in folder.glob("step-*"):
        if step.is_dir() and not step.is_symlink():
            shutil.rmtree(step, ignore_errors=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def recover(
    pruned: str | nn.Module,
    data: str,
    out: str | Path | None,
    config: RecoverConfig | None = None,
    *,
    tokenizer: Any = None,
    val_data: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    on_step: StepCallback | None = None,
    log: LogCallback | None = None,
    command: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> RecoverResult:
    """LoRA-fine-tune ``pruned`` (an export folder or a loaded model) on ``data``; merge; export to ``out``.

    The export carries the prune metadata (plan, widths, base model) with a ``recovery`` entry added.
    ``out`` and the checkpoint folder never overlap an input (:mod:`minillm.output_guard`).
    """
    from minillm.arch import adapter_for
    from minillm.card import render_card
    from minillm.export import check_output_dir, read_metadata, save_pruned
    from minillm.recover.data import load_examples, split

    require_peft()
    config = config or RecoverConfig()
    from minillm.option_checks import check_seed, check_size
    from minillm.output_guard import check_no_overlap

    check_seed(config.seed)
    check_size(max_shard_size, "--max-shard-size")
    inputs = (pruned if isinstance(pruned, str) else None, data, val_data)
    if out is not None:
        check_output_dir(out, overwrite, force, inputs)
    if checkpoint_dir is not None:
        check_no_overlap(checkpoint_dir, inputs, "--checkpoint-dir")
    if out is None and checkpoint_dir is None and (config.save_every or resume):
        raise UsageError("without --out give a checkpoint folder (or set save_every=0)")
    source = pruned if isinstance(pruned, str) else getattr(pruned.config, "_name_or_path", "in-memory model")
    metadata = read_metadata(pruned) if isinstance(pruned, str) and Path(pruned).is_dir() else {}
    if isinstance(pruned, str):
        from minillm.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(pruned, trust_remote_code)
        pruned = load_model(pruned, device_map=None, dtype=dtype,  # accelerate places it
                            trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to read the training data; pass tokenizer=…")
    adapter = adapter_for(pruned.config)
    examples = load_examples(tokenizer, data, config.max_length, config.train_on_inputs)
    if config.max_examples:
        examples = examples[: config.max_examples]
    if val_data:
        train_set, val_set = (
            examples,
            load_examples(tokenizer, val_data, config.max_length, config.train_on_inputs),
        )
        val_set = val_set[: config.val_size]
    else:
        train_set, val_set = split(examples, config.val_size, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    targets = config.target_modules or lora_targets(pruned, adapter)
    config.target_modules = targets
    peft_model = attach_lora(pruned, adapter, config)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)  # type: ignore[arg-type]
    start = time.perf_counter()
    trained, record = train(peft_model, train_set, val_set, config, pad_id, ckpt, resume, on_step, log)
    merged = trained.merge_and_unload()
    merged.eval()
    recovery = {
        "method": "lora",
        "minillm_version": minillm.__version__,
        "data": data,
        "val_data": val_data,
        "config": config.to_dict(),
        "train": record.to_dict(),
        "seconds": round(time.perf_counter() - start, 2),
        "command": command or "",
    }
    metadata = {**metadata, "base_model": metadata.get("base_model", source), "recovery": recovery}
    metadata.setdefault("params_after", sum(p.numel() for p in merged.parameters()))
    if not metadata.get("license"):
        from minillm.hub import base_license

        license_id = base_license(metadata.get("base_model"))  # local README only: no network here
        if license_id:
            metadata["license"] = license_id
    result = RecoverResult(merged, record, None, metadata)
    from accelerate import PartialState

    if out is not None and PartialState().is_main_process:
        result.out = save_pruned(
            merged,
            tokenizer,
            adapter,
            out,
            metadata,
            render_card(metadata),
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            force=force,
            inputs=inputs,
        )
        if not keep_checkpoints:
            _remove_checkpoints(ckpt)
    PartialState().wait_for_everyone()
    return result
