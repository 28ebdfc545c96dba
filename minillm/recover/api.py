"""``recover``: what ``minillm recover`` does, top to bottom: data → teacher → student → train → export.

The method (full-parameter or LoRA) and the loss (distillation from the dense teacher, next-token CE, or
both) are independent choices on one loop. With ``cache_teacher`` the teacher runs first, alone, over
the training data and is released before the student is loaded, so the two never share memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import minillm
from minillm.errors import UsageError
from minillm.recover.config import FULL_PARAMS_LIMIT, RecoverConfig
from minillm.recover.lora import attach_lora, lora_targets, require_peft
from minillm.recover.train import LogCallback, StepCallback, TrainLog, train


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


def _method(config: RecoverConfig, model: nn.Module) -> str:
    if config.method != "auto":
        return config.method
    return "full" if sum(p.numel() for p in model.parameters()) <= FULL_PARAMS_LIMIT else "lora"


def recover(
    pruned: str | nn.Module,
    data: str,
    out: str | Path | None,
    config: RecoverConfig | None = None,
    *,
    tokenizer: Any = None,
    teacher: str | nn.Module | None = None,
    teacher_tokenizer: Any = None,
    teacher_max_memory: str | None = None,
    cache_teacher: str | Path | None = None,
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
    """Train ``pruned`` (an export folder or a loaded model) on ``data``; export to ``out``.

    ``teacher`` (a folder, a cached hub id or a loaded model; default: the export's base model when
    reachable) makes the default loss distillation. The export carries the prune metadata (plan, widths,
    base model) with a ``recovery`` entry added. ``out`` and the checkpoint folder never overlap an input
    (:mod:`minillm.output_guard`).
    """

    from minillm.export import check_output_dir, read_metadata
    from minillm.recover import teacher as teachers
    from minillm.recover import teacher_cache
    from minillm.recover.data import load_examples, split

    config = config or RecoverConfig()
    from minillm.option_checks import check_seed, check_size
    from minillm.output_guard import check_no_overlap

    check_seed(config.seed)
    check_size(max_shard_size, "--max-shard-size")
    inputs = (pruned if isinstance(pruned, str) else None, data, val_data,
              teacher if isinstance(teacher, str) else None)
    if out is not None:
        check_output_dir(out, overwrite, force, inputs)
    if checkpoint_dir is not None:
        check_no_overlap(checkpoint_dir, inputs, "--checkpoint-dir")
    if out is None and checkpoint_dir is None and (config.save_every or resume):
        raise UsageError("without --out give a checkpoint folder (or set save_every=0)")
    source = pruned if isinstance(pruned, str) else getattr(pruned.config, "_name_or_path", "in-memory model")
    metadata = read_metadata(pruned) if isinstance(pruned, str) and Path(pruned).is_dir() else {}
    if isinstance(teacher, nn.Module):
        teacher_source, config.loss = "in-memory model", "kd" if config.loss == "auto" else config.loss
    else:
        teacher_source, config.loss = teachers.resolve(teacher, metadata, config.loss)
    if isinstance(pruned, str):
        from minillm.loading import load_tokenizer

        tokenizer = tokenizer or load_tokenizer(pruned, trust_remote_code)
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to read the training data; pass tokenizer=…")
    examples = load_examples(tokenizer, data, config.max_length, config.train_on_inputs)
    if config.max_examples:
        examples = examples[: config.max_examples]
    if val_data:
        train_set = examples
        val_set = load_examples(tokenizer, val_data, config.max_length, config.train_on_inputs)
        val_set = val_set[: config.val_size]
    else:
        train_set, val_set = split(examples, config.val_size, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = _process_state().device
    if config.mode == "blocks":
        if config.loss == "ce" or teacher_source is None:
            raise UsageError("--mode blocks reconstructs the dense model's blocks: it needs --teacher DENSE")
        if cache_teacher is not None or resume:
            raise UsageError("--mode blocks takes neither --cache-teacher nor --resume (one short walk)")
        config.loss = "block-mse"
    uses_teacher = config.loss != "ce"
    teacher_model: nn.Module | None = None
    if uses_teacher and isinstance(teacher_source, str) and teacher_source != "in-memory model":
        from minillm.loading import load_tokenizer

        teacher_tokenizer = teacher_tokenizer or load_tokenizer(teacher_source)
    cache = None
    if uses_teacher and cache_teacher is not None and (Path(cache_teacher) / "meta.json").is_file():
        cache = teacher_cache.TeacherCache(cache_teacher, train_set, _cache_settings(config, teacher_source))
    elif uses_teacher:
        teacher_model = teacher if isinstance(teacher, nn.Module) else teachers.load(
            teacher_source, dtype, teacher_max_memory, device=device)  # type: ignore[arg-type]
        teachers.check_same_vocabulary(_student_vocab(pruned), teachers.vocabulary_size(teacher_model),
                                       tokenizer, teacher_tokenizer)
    if teacher_model is not None and cache_teacher is not None:
        cache = teacher_cache.build(teacher_model, train_set, cache_teacher,
                                    _cache_settings(config, teacher_source), batch_size=config.batch_size,
                                    pad_id=pad_id, chunk=config.chunk_size, log=log)
        teacher_model = None  # released before the student is loaded: the two never share memory
    if isinstance(pruned, str):
        from minillm.loading import load_model

        pruned = load_model(pruned, device_map=None, dtype=dtype,  # accelerate places it
                            trust_remote_code=trust_remote_code)
    assert isinstance(pruned, nn.Module)
    if config.mode == "blocks":
        assert teacher_model is not None
        result_model, record, method = _blocks(pruned, teacher_model, tokenizer, data, config, log)
    else:
        result_model, record, method = _train(pruned, train_set, val_set, config, pad_id, teacher_model,
                                              cache, checkpoint_dir, out, resume, on_step, log)
    recovery = {
        "method": method,
        "loss": config.loss,
        "teacher": teacher_source if uses_teacher else None,
        "teacher_cache": str(cache_teacher) if cache is not None else None,
        "minillm_version": minillm.__version__,
        "data": data,
        "val_data": val_data,
        "config": config.to_dict(),
        "train": record.to_dict(),
        "seconds": round(record.seconds, 2),
        "command": command or "",
    }
    metadata = {**metadata, "base_model": metadata.get("base_model", source), "recovery": recovery}
    return _export(result_model, record, metadata, tokenizer, out, checkpoint_dir, keep_checkpoints,
                   overwrite, max_shard_size, force, inputs)


def _process_state() -> Any:
    """accelerate's process state, created as ``Accelerator`` creates it (``ACCELERATE_USE_CPU`` → gloo on
    CPU), so that asking for the device before training does not make every rank a lone main process."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _cache_settings(config: RecoverConfig, teacher_source: str | None) -> dict[str, Any]:
    from minillm.recover.teacher_cache import FORMAT

    return {"format": FORMAT, "samples": config.teacher_samples, "temperature": config.temperature,
            "alpha": 1.0, "seed": config.seed, "teacher": str(teacher_source)}


def _student_vocab(pruned: str | nn.Module) -> int:
    if isinstance(pruned, nn.Module):
        return int(pruned.get_output_embeddings().out_features)
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(pruned).vocab_size)


def _blocks(model: nn.Module, teacher: nn.Module, tokenizer: Any, data: str, config: RecoverConfig,
            log: LogCallback | None) -> tuple[nn.Module, TrainLog, str]:
    """Block-local reconstruction (:mod:`minillm.recover.blocks`) of every block, in place."""
    from minillm.arch import adapter_for
    from minillm.recover.blocks import calibration_from, reconstruct

    calibration = calibration_from(tokenizer, data, config.block_samples, config.max_length, config.seed,
                                   config.batch_size)
    start = time.perf_counter()
    errors = reconstruct(model, teacher, adapter_for(model.config), calibration, steps=config.block_steps,
                         lr=config.peak_lr(), seed=config.seed, log=log)
    record = TrainLog(total_steps=config.block_steps * len(errors), steps_per_epoch=config.block_steps,
                      train_examples=calibration.input_ids.shape[0], tokens=calibration.num_tokens)
    record.seconds = time.perf_counter() - start
    record.blocks = {str(i): e for i, e in errors.items()}
    model.requires_grad_(False)
    return model.eval(), record, "blocks"


def _train(model: nn.Module, train_set: list, val_set: list, config: RecoverConfig, pad_id: int,
           teacher: nn.Module | None, cache: Any, checkpoint_dir: Any, out: Any, resume: bool,
           on_step: StepCallback | None, log: LogCallback | None) -> tuple[nn.Module, TrainLog, str]:
    """Set up the trainable tensors and the objective, run the loop, merge LoRA back."""
    from minillm.arch import adapter_for
    from minillm.recover.distill import TokenLoss, check_logit_path, output_head
    from minillm.recover.teacher import teacher_rows

    adapter = adapter_for(model.config)
    config.method = _method(config, model)
    sample = torch.tensor([train_set[0].input_ids[:16]], device=next(model.parameters()).device)
    check_logit_path(model, sample, "student")
    if teacher is not None:
        check_logit_path(teacher, sample, "teacher")
    if config.method == "lora":
        require_peft()
        config.target_modules = config.target_modules or lora_targets(model, adapter)
        trainable = attach_lora(model, adapter, config)
    else:
        trainable = model.requires_grad_(True)
    objective = TokenLoss(trainable, config.loss, config.temperature, config.chunk_size)
    extra = None
    if teacher is not None:
        objective.teacher_head = output_head(teacher)
        extra = lambda batch: {"teacher_rows": teacher_rows(teacher, batch, batch["input_ids"].device)}
    elif cache is not None:
        extra = lambda batch: cache.inputs(batch, batch["input_ids"].device)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is None and out is not None:
        ckpt = default_checkpoint_dir(out)
    trained, record = train(trainable, train_set, val_set, config, pad_id, ckpt, resume, on_step, log,
                            objective=objective, extra_inputs=extra)
    if config.method == "lora":
        trained = trained.merge_and_unload()
    trained.requires_grad_(False)
    trained.eval()
    return trained, record, config.method


def _export(model: nn.Module, record: TrainLog, metadata: dict[str, Any], tokenizer: Any, out: Any,
            checkpoint_dir: Any, keep_checkpoints: bool, overwrite: bool, max_shard_size: str | int,
            force: bool = False, inputs: tuple[Any, ...] = ()) -> RecoverResult:
    from accelerate import PartialState

    from minillm.arch import adapter_for
    from minillm.card import render_card
    from minillm.export import save_pruned

    metadata.setdefault("params_after", sum(p.numel() for p in model.parameters()))
    if not metadata.get("license"):
        from minillm.hub import base_license

        license_id = base_license(metadata.get("base_model"))  # local README only: no network here
        if license_id:
            metadata["license"] = license_id
    result = RecoverResult(model, record, None, metadata)
    if out is not None and PartialState().is_main_process:
        result.out = save_pruned(model, tokenizer, adapter_for(model.config), out, metadata,
                                 render_card(metadata), overwrite=overwrite, max_shard_size=max_shard_size,
                                 force=force, inputs=inputs)
        if not keep_checkpoints:
            _remove_checkpoints(Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out))
    PartialState().wait_for_everyone()
    return result
