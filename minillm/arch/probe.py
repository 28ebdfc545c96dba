"""A self-check for a family outside the tested matrix: cut a tiny copy, compare it with masking.

The structural adapter recognises blocks by module names, but a family it has never seen may still
compute something the names do not reveal (a head count read from the config in ``forward``, another
fused layout). Before such a family is pruned, :func:`self_check` builds a two-layer copy of its config
(small vocabulary and MLP, the real attention shape), perturbs every parameter, removes a key/value
group (or one query head per group) and half the MLP channels in each layer, and requires the cut copy
to reproduce the masked one — full forward and a KV-cached decoding step. Otherwise the family is
refused with one line; it is never pruned into a silently wrong model. Results are cached per
``model_type`` for the process.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from minillm.arch.base import ArchAdapter
from minillm.errors import UsageError

_CHECKED: dict[str, str | None] = {}  # model_type -> refusal (None: passed)


def _tiny_config(config: Any) -> Any:
    tiny = copy.deepcopy(config)
    layers = int(tiny.num_hidden_layers)
    keep = min(layers, 2)
    for key, value in list(tiny.__dict__.items()):
        if isinstance(value, list) and len(value) == layers:  # per-layer lists (layer_types, …)
            setattr(tiny, key, value[:keep])
    tiny.num_hidden_layers = keep
    tiny.vocab_size = min(int(tiny.vocab_size), 256)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tiny, key, None)
        if (isinstance(value, int) and value >= tiny.vocab_size) or isinstance(value, list):
            setattr(tiny, key, None)
    if isinstance(getattr(tiny, "intermediate_size", None), int):
        tiny.intermediate_size = min(tiny.intermediate_size, 64)
    return tiny


def _probe_plan(model: torch.nn.Module, adapter: ArchAdapter) -> Any:
    from minillm.plan import LayerPlan, PrunePlan

    layers = []
    for index in range(len(adapter.decoder_layers(model))):
        shape = adapter.layer_shape(model, index)
        group = shape.heads_per_kv
        if shape.num_kv_heads > 1:  # drop key/value group 0 and its query heads
            kv = list(range(1, shape.num_kv_heads))
            heads = [h for h in range(shape.num_heads) if h // group != 0]
        else:  # drop the first query head of every group
            kv = list(range(shape.num_kv_heads))
            heads = [h for h in range(shape.num_heads) if h % group != 0 or group == 1]
        layers.append(LayerPlan(index, heads, kv, list(range(1, shape.intermediate, 2))))
    total = sum(p.numel() for p in model.parameters())
    return PrunePlan(head_mode="kv", allocation="global", layers=layers, params_before=total,
                     params_after=total, target_ratio=0.0)


@torch.no_grad()
def _run(config: Any, adapter: ArchAdapter) -> str | None:
    from transformers import AutoModelForCausalLM

    from minillm.surgery import apply_plan, mask_plan

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(config), dtype=torch.float32,
                                                 trust_remote_code=bool(getattr(config, "auto_map", None)))
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    model.eval()
    plan = _probe_plan(model, adapter)
    masked = copy.deepcopy(model)
    mask_plan(masked, adapter, plan)
    apply_plan(model, adapter, plan)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=generator)
    expected, actual = masked(ids).logits, model(ids).logits
    with warnings.catch_warnings():  # some families rename past_key_values; the value is what counts
        warnings.simplefilter("ignore", FutureWarning)
        step = model(ids[:, :9], use_cache=True)
        cached = model(ids[:, 9:], past_key_values=step.past_key_values, use_cache=True).logits[:, -1]
    scale = float(expected.abs().max()) + 1e-6
    error = max(float((actual - expected).abs().max()), float((cached - expected[:, -1]).abs().max()))
    if error > 1e-4 * max(scale, 1.0):
        return f"a pruned tiny copy differs from the masked one (max |Δlogit| {error:.2e})"
    return None


def self_check(config: Any, adapter: ArchAdapter) -> None:
    """Refuse (one line) a family outside the tested matrix unless a tiny copy prunes exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _CHECKED:
        try:
            _CHECKED[model_type] = _run(config, adapter)
        except UsageError as exc:
            _CHECKED[model_type] = str(exc)
        except Exception as exc:  # any failure of an unknown family's code is a refusal, not a traceback
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            _CHECKED[model_type] = (
                f"a pruning self-check on a tiny copy failed ({type(exc).__name__}: {first})"
            )
    reason = _CHECKED[model_type]
    if reason is not None:
        if reason.startswith("unsupported architecture"):
            raise UsageError(reason)
        raise UsageError(f"unsupported architecture {model_type!r}: {reason}")
