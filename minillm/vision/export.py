"""Save and load CNNs as ``model.safetensors`` + ``minillm_cnn.json`` (architecture spec, plan, metadata).

Why not ``torch.save``: a pickled pruned module can only be loaded with the exact code that pruned it.
The JSON spec (:func:`minillm.vision.models.arch_spec`) rebuilds the pruned widths with the plain
constructors and the safetensors file fills them, so any later version of the code can load it.

Writes are atomic: everything goes to a temporary folder next to the target, which then replaces it;
an error leaves the previous export (or nothing) in place, never half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from minillm.vision.models import arch_spec, build_model

WEIGHTS = "model.safetensors"
CONFIG = "minillm_cnn.json"
FORMAT_VERSION = 1


def save_model(
    model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None = None, name: str | None = None
) -> Path:
    """Write ``model`` (weights + spec + ``meta``) to ``out_dir`` atomically; returns the folder."""
    from safetensors.torch import save_file

    from minillm.output_guard import check_no_overlap

    out = Path(out_dir)
    check_no_overlap(out)  # never the current or home directory
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).exists():
        raise FileExistsError(f"{out} is a non-empty folder that is not a minillm CNN export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        config = {"format_version": FORMAT_VERSION, "spec": arch_spec(model, name), "meta": meta or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: not a minillm CNN export (no {CONFIG})")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {config.get('format_version')!r}")
    return config


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from its spec and load its weights; returns ``(model in eval mode, config)``."""
    from safetensors.torch import load_file

    config = read_config(model_dir)
    model = build_model(config["spec"])
    model.load_state_dict(load_file(str(Path(model_dir) / WEIGHTS)), strict=True)
    return model.eval(), config
