"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import random_ids, tiny_config

from minillm.calibration.data import CalibrationSet
from minillm.loading import load_model


def offloaded(model: torch.nn.Module, folder: Path, dtype: str = "float32") -> torch.nn.Module:
    """The same weights reloaded with a cap that sends every module to accelerate's disk offload
    (``dtype="auto"``: the dtype they were saved in, e.g. float64)."""
    model.save_pretrained(folder)
    loaded = load_model(
        str(folder),
        device_map="auto",
        max_memory={"cpu": "30KB"},
        dtype=dtype,
        offload_dir=str(folder / "offload"),
    )
    layer = loaded.get_decoder().layers[0]
    assert next(layer.parameters()).device.type == "meta"  # really offloaded
    return loaded


RELOAD = r"""
import json, sys
sys.modules["minillm"] = None  # prove the export needs no minillm
import torch
from transformers import AutoModelForCausalLM
folder, ids_path, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
ids = torch.tensor(json.load(open(ids_path)))
with torch.no_grad():
    logits = model(ids).logits
params = sum(p.numel() for p in model.parameters())
torch.save({"logits": logits, "params": params}, folder + "/../reloaded.pt")
"""


def reload_in_fresh_process(folder: Path, ids: torch.Tensor, remote: bool) -> dict:
    """Logits and parameter count of an export loaded by a fresh process that cannot import minillm."""
    ids_path = folder.parent / "ids.json"
    ids_path.write_text(json.dumps(ids.tolist()))
    subprocess.run([sys.executable, "-c", RELOAD, str(folder), str(ids_path), "1" if remote else "0"],
                   check=True, capture_output=True, text=True)
    return torch.load(folder.parent / "reloaded.pt")


def pattern_text(path: Path, vocab: int, words: int = 1200) -> Path:
    """A learnable stream: a fixed 23-word cycle, so a few training steps can lower the loss."""
    cycle = [f"w{(7 * i) % (vocab - 3)}" for i in range(23)]
    tokens = [cycle[i % len(cycle)] for i in range(words)]
    path.write_text("\n".join(" ".join(tokens[k : k + 20]) for k in range(0, words, 20)) + "\n")
    return path


def four_layer_model(family: str, random_biases: bool = False) -> torch.nn.Module:
    """A 4-layer tiny model of ``family`` whose norms are not the identity (so cutting hidden channels or
    layers changes what they compute); ``random_biases`` also draws every bias (zero at init)."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.num_hidden_layers = 4
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % 2] for i in range(4)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.3, 0.3) if "gemma" in family else param.uniform_(0.7, 1.3)
            elif random_biases and name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def deep_model(family: str, layers: int = 4, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``family`` with ``layers`` decoder layers and random biases and norm weights."""
    from transformers import AutoModelForCausalLM

    if family == "llama-bias":
        config = tiny_config("llama")
        config.attention_bias = True
        config.mlp_bias = True
    else:
        config = tiny_config(family)
    config.num_hidden_layers = layers
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = [config.layer_types[0]] * layers
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)  # non-trivial norm weights, so slicing them is exercised
    return model.eval()


def search_model(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama (4 query heads over 2 kv heads, hidden 128, MLP 192) with non-trivial norms, for
    architecture-search tests."""
    return deep_model("llama", layers=layers, seed=seed, hidden_size=128, intermediate_size=192)


def search_calibration(n: int = 8) -> CalibrationSet:
    return CalibrationSet(random_ids(n, 16, seed=3), batch_size=2)


def record_search_windows(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Patch the compensation pass and the held-out loss to record the windows each one sees during a
    search: ``{"compensated": [...], "scored": [...]}`` (``monkeypatch.undo()`` ends the recording)."""
    import minillm.calibration.forward as forward
    import minillm.compensation.sequential as sequential

    seen: dict[str, list[torch.Tensor]] = {"compensated": [], "scored": []}
    compensate, loss = sequential.compensate_sequential, forward.mean_loss

    def recording_compensate(model, adapter, plan, calibration, *args, **kwargs):
        seen["compensated"].append(calibration.input_ids)
        return compensate(model, adapter, plan, calibration, *args, **kwargs)

    def recording_loss(model, calibration):
        seen["scored"].append(calibration.input_ids)
        return loss(model, calibration)

    monkeypatch.setattr(sequential, "compensate_sequential", recording_compensate)
    monkeypatch.setattr(forward, "mean_loss", recording_loss)
    return seen


def assert_cut_equals_compensated(model: torch.nn.Module, plan) -> None:
    """Mask ≡ surgery after compensation: a physically cut copy of ``model`` (compensated in place, the
    removed groups' closing columns zero) gives the same logits as ``model`` itself."""
    import copy

    from minillm.arch import adapter_for
    from minillm.surgery import apply_plan

    cut = copy.deepcopy(model)
    apply_plan(cut, adapter_for(model.config), plan)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
