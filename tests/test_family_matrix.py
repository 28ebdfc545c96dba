"""Every model family in one table (conftest.MATRIX): cut ≡ mask, KV-cache generation, exports reload.

Per row, from a tiny random model of the family: a uniform plan (magnitude scores, default head mode)
and a global plan (the default criterion). Each is checked: the physically pruned model's logits equal
the dense model with the same groups masked (float32, atol 1e-5) and it has exactly the planned
parameter count; (global plan) greedy generation with the KV cache equals the masked model's and the
uncached run; the export reloads with identical logits — with vanilla ``from_pretrained`` where the
config can express the uniform widths (the row says so), through its generated remote code otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import MATRIX, random_ids, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from minillm.api import prune
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError
from minillm.export import save_pruned
from minillm.surgery import apply_plan, mask_plan


def _plan(model, allocation: str, criterion: str, head_mode: str = "auto"):
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    return prune(model, ratio=0.3, calib=calibration, allocation=allocation, criterion=criterion,
                 head_mode=head_mode, spsa_steps=2, dry_run=True).plan


def _cut_and_check(family: str, allocation: str, criterion: str, generate: bool):
    """Prune a fresh model of ``family``; assert cut ≡ mask (and cached generation); return it."""
    model = tiny_model(family)
    plan = _plan(model, allocation, criterion)
    assert any(len(p.channels) < 96 for p in plan.layers)
    # --ratio is a fraction of every distinct parameter (tied heads once, embeddings included) in every
    # family, and the per-group costs (fused rows, biases, per-head norms) add up exactly
    assert plan.params_before == sum(p.numel() for p in model.parameters())
    assert abs(plan.achieved_ratio - 0.3) < 0.01
    adapter = adapter_for(model.config)
    masked = copy.deepcopy(model)
    mask_plan(masked, adapter, plan)
    apply_plan(model, adapter, plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params_after
    ids = random_ids(2, 12, seed=7)  # longer than the rows' sliding window (4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-5, rtol=0)
        if generate:
            greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
            prompt = ids[:1, :6]
            cached = model.generate(prompt, **greedy, use_cache=True)
            reference = masked.generate(prompt, **greedy, use_cache=True)
            uncached = model.generate(prompt, **greedy, use_cache=False)
            assert cached.shape == (1, 10)
            assert torch.equal(cached, reference) and torch.equal(cached, uncached)
    return model, plan


def _export_reloads(model, plan, folder: Path, expect_remote: bool) -> None:
    save_pruned(model, tiny_tokenizer(), adapter_for(model.config), folder, {"plan": plan.to_dict()}, "---\n")
    remote = (folder / "modeling_minillm.py").is_file()
    assert remote == expect_remote
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after
    ids = random_ids(2, 12, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(MATRIX))
def test_family(family: str, tmp_path: Path) -> None:
    model, plan = _cut_and_check(family, "uniform", "magnitude", generate=False)
    _export_reloads(model, plan, tmp_path / f"{family}-uniform", expect_remote=not MATRIX[family].vanilla)
    model, plan = _cut_and_check(family, "global", "flap", generate=True)
    vanilla = plan.is_uniform() and MATRIX[family].vanilla  # a global plan may still come out uniform
    _export_reloads(model, plan, tmp_path / f"{family}-global", expect_remote=not vanilla)


def test_single_kv_head_prunes_query_heads_and_refuses_kv_mode() -> None:
    model = tiny_model("gemma3-1kv")
    # global: per-layer head counts, so 3 of 4 query heads may stay (uniform keeps an expressible count)
    plan = _plan(model, "global", "magnitude")
    assert plan.head_mode == "query"
    assert all(p.kv_heads == [0] for p in plan.layers) and any(len(p.heads) < 4 for p in plan.layers)
    with pytest.raises(UsageError, match=r"single key/value head.*--head-mode query"):
        _plan(model, "uniform", "magnitude", head_mode="kv")
    assert _plan(tiny_model("llama"), "uniform", "magnitude").head_mode == "kv"


def _outside(model_type: str):
    from conftest import GQA, VOCAB
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256, **GQA)
    torch.manual_seed(0)  # test-only
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ["arcee", "nemotron"])  # ReLU² up/down MLPs, outside the matrix
def test_family_outside_the_matrix_prunes_exactly(model_type: str) -> None:
    model = _outside(model_type)
    plan = _plan(model, "global", "magnitude")
    adapter = adapter_for(model.config)
    masked = copy.deepcopy(model)
    mask_plan(masked, adapter, plan)
    apply_plan(model, adapter, plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params_after < plan.params_before
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("mixtral", "the MLP of MixtralDecoderLayer is not understood"),  # mixture of experts
        ("bitnet", "self-check on a tiny copy failed"),  # a norm over the heads' joint output
        ("persimmon", "no q/k/v projections"),  # fused query_key_value of its own layout
    ],
)
def test_family_outside_the_matrix_is_refused_in_one_line(model_type: str, reason: str) -> None:
    model = _outside(model_type)
    with pytest.raises(UsageError) as info:
        _plan(model, "uniform", "magnitude")
    message = str(info.value)
    assert message.startswith(f"unsupported architecture {model_type!r}") and reason in message
    assert "\n" not in message


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])  # [q; k; v] + [gate; up], interleaved qkv
def test_every_criterion_scores_fused_projections(family: str) -> None:
    """Every registered criterion reads a fused projection's rows per head / channel: its plan cuts the
    fused Linears into a model equal to the masked one."""
    from minillm.api import plan_from_scores, score_model
    from minillm.calibration.spsa import SpsaConfig
    from minillm.scoring import CRITERIA

    dense = tiny_model(family)
    ids = random_ids(2, 12, seed=7)
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    for criterion in CRITERIA.names():
        model = copy.deepcopy(dense)
        result = score_model(model, criterion, calibration, [0, 1], 0, SpsaConfig(steps=2, eps=1e-3, seed=0))
        plan = plan_from_scores(model, result, 0.3, "global")
        adapter = adapter_for(model.config)
        masked = copy.deepcopy(model)
        mask_plan(masked, adapter, plan)
        apply_plan(model, adapter, plan)
        assert sum(p.numel() for p in model.parameters()) == plan.params_after, criterion
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-5, rtol=0,
                                       msg=lambda text, name=criterion: f"{name}: {text}")
