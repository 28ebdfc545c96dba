"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

from pathlib import Path

import torch

from minillm.loading import load_model


def offloaded(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The same weights reloaded with a cap that sends every module to accelerate's disk offload."""
    model.save_pretrained(folder)
    loaded = load_model(
        str(folder),
        device_map="auto",
        max_memory={"cpu": "30KB"},
        dtype="float32",
        offload_dir=str(folder / "offload"),
    )
    layer = loaded.get_decoder().layers[0]
    assert next(layer.parameters()).device.type == "meta"  # really offloaded
    return loaded
