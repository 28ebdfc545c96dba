"""Hidden-size surgery across the family matrix (issue 17): every family with an exact form equals the
reference computed here and reloads with vanilla ``from_pretrained``; the others refuse in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MATRIX, random_ids, tiny_config

from minillm.arch import adapter_for
from minillm.errors import UsageError
from minillm.surgery_hidden import slice_hidden

#: families without an exact form for a smaller hidden size, and a word of the reason they give
REFUSED = {"opt": "head_dim", "gpt_neox": "head_size", "stablelm": "head_dim", "phi": "qk_layernorm"}
EXACT = [family for family in MATRIX if family not in REFUSED] + ["phi-plain"]  # phi, qk_layernorm off


def random_model(family: str, tied: bool | None = None) -> torch.nn.Module:
    """A tiny model of ``family`` with random norm weights and biases (zero/one inits would hide slicing
    mistakes)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("phi" if family == "phi-plain" else family)
    if family == "phi-plain":
        config.qk_layernorm = False
    if tied is not None:
        config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
            elif "norm" in name:
                param.uniform_(-0.5, 0.5) if "gemma" in family else param.uniform_(0.5, 1.5)
    return model.eval()


def residual_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Norms over the residual stream, found by name and shape (not by the library's adapter)."""
    hidden = model.config.hidden_size
    return [m for name, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and not name.rsplit(".", 1)[-1].startswith(("q_", "k_"))
            and getattr(m, "weight", None) is not None and tuple(m.weight.shape) == (hidden,)]


def reference_logits(model: torch.nn.Module, kept: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The dense model with the removed channels zeroed in the embedding and in every writer's output rows,
    and every residual-stream norm normalising the kept channels only (zero on the removed ones)."""
    ref = copy.deepcopy(model)
    hidden = ref.config.hidden_size
    keep = torch.tensor(kept)
    removed = torch.tensor(sorted(set(range(hidden)) - set(kept)))
    adapter = adapter_for(ref.config)
    with torch.no_grad():
        ref.get_input_embeddings().weight[:, removed] = 0
        for layer in adapter.decoder_layers(ref):
            for writer in (adapter.attention(layer).o, adapter.mlp(layer).closing):
                writer.weight[removed, :] = 0
                if writer.bias is not None:
                    writer.bias[removed] = 0

    def kept_only(norm: torch.nn.Module):
        small = copy.deepcopy(norm)
        with torch.no_grad():
            for name in ("weight", "bias"):
                if isinstance(getattr(small, name, None), torch.nn.Parameter):
                    setattr(small, name, torch.nn.Parameter(getattr(small, name)[keep].clone()))
        if isinstance(getattr(small, "normalized_shape", None), tuple):
            small.normalized_shape = (len(kept),)

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(x)
            out[..., keep] = small(x[..., keep]).to(x.dtype)
            return out
        return forward

    for norm in residual_norms(ref):
        norm.forward = kept_only(norm)
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("family", EXACT)
def test_hidden_surgery_equals_the_reference_for_every_family(family: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tied = True if family.startswith("gemma") or family == "cohere" else None
    model = random_model(family, tied)
    kept = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(1))[:48].tolist())
    ids = random_ids(2, 12, seed=6)
    expected = reference_logits(model, kept, ids)
    slice_hidden(model, adapter_for(model.config), kept)
    actual = model(ids).logits.detach()
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)
    assert model.config.hidden_size == 48
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(ids).logits.detach(), actual, atol=0, rtol=0)
    tied_now = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied_now == bool(model.config.tie_word_embeddings)
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied_now


def test_gemma_untied_head_keeps_its_final_norm() -> None:
    """Untied, only the embedding carries Gemma's normaliser fix; the head and final norm are sliced."""
    model = random_model("gemma3", tied=False)
    norm_before = model.model.norm.weight.detach().clone()
    kept = list(range(0, 64, 4)) + list(range(1, 64, 4)) + list(range(2, 64, 4))
    ids = random_ids(2, 10, seed=2)
    expected = reference_logits(model, sorted(kept), ids)
    slice_hidden(model, adapter_for(model.config), kept)
    torch.testing.assert_close(model.model.norm.weight, norm_before[sorted(kept)], atol=0, rtol=0)
    torch.testing.assert_close(model(ids).logits.detach(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_without_an_exact_form_refuse_in_one_line(family: str) -> None:
    model = random_model(family)
    if family == "phi":
        assert model.config.qk_layernorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=REFUSED[family]) as info:
        slice_hidden(model, adapter_for(model.config), list(range(48)))
    assert "\n" not in str(info.value) and "prune attn, mlp or layers" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-done


def deep_random_model(family: str, layers: int = 4) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % 2] for i in range(layers)]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("structures", ["attn,mlp,hidden", "layers"])
@pytest.mark.parametrize("family", ["qwen3", "mistral", "phi3", "gemma3", "cohere"])
def test_prune_every_axis_of_the_new_families_exports_a_stock_config(family: str, structures: str,
                                                                     tmp_path) -> None:
    """The planner's exact parameter count holds for fused projections (phi3), per-head norms (cohere)
    and Gemma's normaliser; the export reloads vanilla with the same logits."""
    from transformers import AutoModelForCausalLM

    from minillm.api import count_parameters, prune
    from minillm.calibration.data import CalibrationSet

    model = deep_random_model(family)
    calibration = CalibrationSet(random_ids(4, 12, seed=1), batch_size=2)
    result = prune(model, ratio=0.3, calib=calibration, structures=structures, spsa_steps=2,
                   out=tmp_path / "out")
    plan = result.plan
    assert count_parameters(result.model) == plan.params_after
    assert "compensation_params" not in plan.extra  # the planner's count was the export's, exactly
    assert abs(plan.achieved_ratio - 0.3) < 0.1
    assert (plan.hidden is not None) == ("hidden" in structures)
    assert (plan.kept_layers is not None) == ("layers" in structures)
    assert not (tmp_path / "out" / "modeling_minillm.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(2, 10, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, atol=0, rtol=0)
    assert reloaded.config.hidden_size == len(plan.hidden or range(64))
