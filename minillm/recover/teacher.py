"""The distillation teacher: which model it is, loading it (same device or offloaded), checking it speaks
the student's vocabulary, and its part of each batch (hidden rows, computed in inference mode).

The default teacher is the dense model the export was pruned from (``minillm.json`` ``base_model``) when
it is reachable without the network: a local folder, or a hub id already in the local cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.errors import UsageError
from minillm.recover.distill import execution_device, final_hidden, target_rows


def reachable(source: str | None) -> bool:
    """A local model folder, or a hub id whose config is in the local cache (no network)."""
    if not source:
        return False
    if Path(source).expanduser().is_dir():
        return (Path(source).expanduser() / "config.json").is_file()
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # an id that is not a valid repo name
        return False


def resolve(teacher: str | None, metadata: dict[str, Any], loss: str) -> tuple[str | None, str]:
    """(teacher source or None, resolved loss). ``loss="auto"``: kd when a teacher is available."""
    if teacher is not None and not reachable(teacher):
        raise UsageError(f"--teacher {teacher!r} is not a local model folder or a cached hub id")
    base = metadata.get("base_model")
    source = teacher or (base if loss != "ce" and reachable(base) else None)
    if loss == "auto":
        return source, "kd" if source else "ce"
    if loss in ("kd", "kd+ce") and source is None:
        hint = f" (the export's base model {base!r} is not reachable)" if base else ""
        raise UsageError(f"--loss {loss} needs a teacher: pass --teacher DENSE_MODEL{hint}")
    return (source if loss != "ce" else None), loss


def load(source: str, dtype: str = "auto", max_memory: str | None = None, trust_remote_code: bool = False,
         device: torch.device | str | None = None) -> nn.Module:
    """The teacher in eval mode with no trainable tensors; ``max_memory`` offloads it with accelerate."""
    from minillm.loading import load_model

    if max_memory:
        model = load_model(source, device_map="auto", max_memory=max_memory, dtype=dtype,
                           trust_remote_code=trust_remote_code)
    else:
        model = load_model(source, device_map=None, dtype=dtype, trust_remote_code=trust_remote_code)
        if device is not None:
            model.to(device)
    model.requires_grad_(False)
    return model.eval()


def _vocab(tokenizer: Any) -> dict[str, int]:
    return tokenizer.get_vocab() if tokenizer is not None else {}


def check_same_vocabulary(student_size: int, teacher_size: int, student_tok: Any, teacher_tok: Any) -> None:
    """One line when the two models do not share token ids (distillation compares them id by id)."""
    if student_size != teacher_size:
        raise UsageError(
            f"the teacher's vocabulary ({teacher_size} logits) differs from the student's ({student_size}); "
            "distil from the model the student was pruned from"
        )
    if teacher_tok is not None and student_tok is not None and _vocab(teacher_tok) != _vocab(student_tok):
        raise UsageError(
            "the teacher's tokenizer maps tokens to different ids than the student's; "
            "distil from the model the student was pruned from"
        )


def vocabulary_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().out_features)


def teacher_rows(teacher: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The teacher's final hidden states at the batch's target positions, computed in inference mode
    (no graph) and returned as an ordinary tensor on ``device``."""
    first = execution_device(teacher.get_input_embeddings())
    with torch.inference_mode():
        hidden = final_hidden(teacher, batch["input_ids"].to(first), batch["attention_mask"].to(first))
        rows, _, _ = target_rows(hidden, batch["labels"].to(hidden.device))
    return rows.clone().to(device)  # clone outside inference mode: a normal tensor, usable by autograd ops
