"""LoRA adapters (peft) for recovery: which Linears to adapt, and a seeded attachment."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.errors import UsageError
from minillm.recover.config import RecoverConfig


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UsageError("recover --method lora needs peft: pip install 'minillm-prune[recover]'") from None
    return peft


def lora_targets(model: nn.Module, adapter: ArchAdapter) -> list[str]:
    """Names (last component) of every prunable projection, read from the adapter, in layer order."""
    names = {module: name.rpartition(".")[2] for name, module in model.named_modules()}
    targets: list[str] = []
    for layer in adapter.decoder_layers(model):
        for linear in adapter.prunable_linears(layer):
            if names[linear] not in targets:
                targets.append(names[linear])
    return targets


def attach_lora(model: nn.Module, adapter: ArchAdapter, config: RecoverConfig) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; LoRA A is initialised from an explicit seeded generator."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules or lora_targets(model, adapter)
    available = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in available]
    if missing:
        raise UsageError(
            f"--target-modules {', '.join(missing)} not found; this model's Linear layers are "
            f"{', '.join(sorted(available))}"
        )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:  # peft's default init for A, but from our generator
                weight = torch.empty(param.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                param.copy_(weight)
    return peft_model
