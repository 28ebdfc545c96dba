"""Hidden-size and depth pruning (issue 17): surgery equals a reference computed here, exports reload
with vanilla ``from_pretrained``, the all-axes planner meets the ratio and refuses what a stock config
cannot hold."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, random_ids
from helpers import deep_model

from minillm.api import count_parameters, prune
from minillm.arch import adapter_for
from minillm.axes_stats import HiddenStats, block_influence, hidden_activation
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError
from minillm.plan import PrunePlan, parse_structures, structures_label
from minillm.surgery_depth import remove_layers
from minillm.surgery_hidden import slice_hidden

HIDDEN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "llama-mha-tied", "llama-bias"]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- depth --------------------------------------------------------------------------------------------


def skipped_reference(model: torch.nn.Module, skipped: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The dense model with ``skipped`` layers passing their input through (written here, not the
    library's)."""
    layers = adapter_for(model.config).decoder_layers(model)
    hooks = [layers[i].register_forward_hook(lambda m, a, k, out: a[0] if a else k["hidden_states"],
                                             with_kwargs=True) for i in skipped]
    try:
        return logits(model, ids)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "opt"])
def test_layer_removal_equals_dense_with_those_layers_skipped(family: str) -> None:
    model = deep_model(family)
    ids = random_ids(2, 12, seed=4)
    expected = skipped_reference(model, [1, 2], ids)
    adapter = adapter_for(model.config)
    remove_layers(model, adapter, [0, 3])
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    assert model.config.num_hidden_layers == 2 == len(adapter.decoder_layers(model))
    layer_idx = [m.layer_idx for layer in adapter.decoder_layers(model) for m in layer.modules()
                 if hasattr(m, "layer_idx")]
    assert sorted(set(layer_idx)) == [0, 1]
    prompt = random_ids(1, 5, seed=3)  # the KV cache is indexed by the renumbered layer_idx
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sliding_window_layer_types_follow_the_kept_layers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = deep_model("qwen2", layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2,
                       layer_types=["full_attention", "full_attention", "sliding_attention",
                                    "sliding_attention"])
    ids = random_ids(2, 12, seed=5)
    expected = skipped_reference(model, [0, 3], ids)
    remove_layers(model, adapter_for(model.config), [1, 2])
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_removing_every_layer_is_refused_in_one_line() -> None:
    model = deep_model("llama")
    with pytest.raises(UsageError, match="removes all 4 decoder layers") as info:
        remove_layers(model, adapter_for(model.config), [])
    assert "\n" not in str(info.value)
    assert len(adapter_for(model.config).decoder_layers(model)) == 4  # nothing half-done


# --- hidden size --------------------------------------------------------------------------------------


def hidden_reference(model: torch.nn.Module, kept: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Dense model with removed hidden channels zeroed in the embedding and every writer's output rows, and
    every residual-stream RMSNorm computing its mean square over the kept channels only."""
    ref = copy.deepcopy(model)
    hidden = ref.config.hidden_size
    removed = torch.tensor(sorted(set(range(hidden)) - set(kept)))
    keep = torch.tensor(kept)
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, removed] = 0
        for layer in ref.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight[removed, :] = 0
                if writer.bias is not None:
                    writer.bias[removed] = 0

    def kept_mean_rmsnorm(norm):
        def forward(x):
            x32 = x.float()
            variance = x32[..., keep].pow(2).mean(-1, keepdim=True)
            return norm.weight * (x32 * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)
        return forward

    for layer in ref.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = kept_mean_rmsnorm(norm)
    ref.model.norm.forward = kept_mean_rmsnorm(ref.model.norm)
    if not ref.config.tie_word_embeddings:
        pass  # the LM head reads the final norm's output, already zero on removed channels
    return logits(ref, ids)


@pytest.mark.parametrize("family", HIDDEN_FAMILIES)
def test_hidden_surgery_equals_the_reference_and_reloads_vanilla(family: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = deep_model(family, layers=2)
    kept = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(1))[:48].tolist())
    ids = random_ids(2, 12, seed=6)
    expected = hidden_reference(model, kept, ids)
    slice_hidden(model, adapter_for(model.config), kept)
    actual = logits(model, ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert model.config.hidden_size == 48
    if family == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)  # per head_dim, untouched
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded, ids), actual)
    tied = model.config.tie_word_embeddings
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_hidden_not_divisible_by_heads_is_refused_in_one_line() -> None:
    model = deep_model("llama", layers=2)
    with pytest.raises(UsageError, match="not divisible by the 4 attention heads") as info:
        slice_hidden(model, adapter_for(model.config), list(range(30)))
    assert "\n" not in str(info.value) and "--round-to" in str(info.value)
    assert model.model.embed_tokens.weight.shape == (VOCAB, 64)


def test_hidden_pruning_of_opt_is_refused_before_any_work() -> None:
    model = deep_model("opt", layers=2)
    calibration = CalibrationSet(random_ids(2, 8, seed=1), batch_size=2)
    with pytest.raises(UsageError, match="no exact form for opt: its attention derives head_dim"):
        prune(model, ratio=0.2, calib=calibration, structures="hidden", dry_run=True)


# --- statistics ---------------------------------------------------------------------------------------


def test_block_influence_and_hidden_activation_reductions() -> None:
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    total, count = block_influence(h, h * 3.0)
    assert count == 10 and abs(total) < 1e-12  # same direction: no influence
    total, count = block_influence(h, -h)
    assert total == pytest.approx(20.0)  # opposite direction: 1 - (-1) per token
    stats = HiddenStats()
    a, b = torch.randn(2, 5, 8), torch.randn(3, 5, 8)
    stats.add(0, a)
    stats.add(0, b)
    expected = torch.linalg.vector_norm(torch.cat([a, b]).abs().double().mean(1), dim=0)
    torch.testing.assert_close(stats.scores().double(), expected, rtol=1e-6, atol=1e-6)
    assert hidden_activation(a).shape == (2, 8)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_executor_statistics_equal_a_plain_forward_observed_by_hooks(family: str) -> None:
    from minillm.axes_stats import collect_axis_stats

    model = deep_model(family, layers=3)
    calibration = CalibrationSet(random_ids(4, 10, seed=2), batch_size=2)
    hidden, influence = collect_axis_stats(model, adapter_for(model.config), calibration, True, [0, 2])
    norms = [m for layer in model.model.layers
             for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    per_norm = {i: [] for i in range(len(norms))}
    pairs = {0: [], 2: []}
    hooks = [n.register_forward_hook(lambda m, a, out, i=i: per_norm[i].append(out))
             for i, n in enumerate(norms)]
    hooks += [model.model.layers[i].register_forward_hook(lambda m, a, out, i=i: pairs[i].append((a[0], out)))
              for i in pairs]
    with torch.no_grad():
        for batch in calibration.batches():
            model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    expected = sum(torch.linalg.vector_norm(torch.cat(outs).abs().double().mean(1), dim=0)
                   for outs in per_norm.values())
    torch.testing.assert_close(hidden.double(), expected, rtol=1e-5, atol=1e-6)
    for i, seen in pairs.items():
        h_in = torch.cat([a for a, _ in seen]).flatten(0, 1)
        h_out = torch.cat([b for _, b in seen]).flatten(0, 1)
        cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        assert influence[i] == pytest.approx(float((1 - cos).mean()), rel=1e-6)


# --- planning and the whole run -----------------------------------------------------------------------


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)


def test_structures_parse_and_label() -> None:
    assert parse_structures("both") == {"attn", "mlp"}
    assert structures_label(parse_structures("mlp,attn")) == "both"
    assert structures_label(parse_structures("layers, hidden,mlp")) == "mlp,hidden,layers"
    with pytest.raises(UsageError, match="comma list"):
        parse_structures("attn,depth")


@pytest.mark.parametrize(("structures", "layer_score"), [
    ("layers", "influence"), ("layers", "loss"), ("attn,mlp,hidden", "influence"),
    ("mlp,hidden,layers", "influence"),
])
def test_prune_all_axes_exports_a_stock_config(structures: str, layer_score: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = deep_model("llama", layers=8, hidden_size=128, intermediate_size=192)
    before = count_parameters(model)
    result = prune(model, ratio=0.25, calib=_calibration(), structures=structures, layer_score=layer_score,
                   spsa_steps=2, out=tmp_path / "out", round_to=1 if "mlp" not in structures else 8)
    plan = result.plan
    assert count_parameters(result.model) == plan.params_after
    assert abs(plan.achieved_ratio - 0.25) < 0.05 and plan.params_before == before
    if "layers" in structures:
        assert plan.kept_layers and len(plan.kept_layers) < 8
        assert result.model.config.num_hidden_layers == len(plan.kept_layers)
    if "hidden" in structures:
        assert plan.hidden is not None and result.model.config.hidden_size == len(plan.hidden)
        assert len(plan.hidden) % 8 == 0 or "mlp" not in structures
    if "mlp" in structures:
        assert result.model.config.intermediate_size % 8 == 0
    assert PrunePlan.from_dict(json.loads(plan.to_json())).to_dict() == plan.to_dict()
    assert not (tmp_path / "out" / "modeling_minillm.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(2, 10, seed=9)
    assert torch.equal(logits(reloaded, ids), logits(result.model, ids))


def test_round_to_widths_are_multiples_and_an_impossible_one_is_refused() -> None:
    model = deep_model("llama", layers=2, hidden_size=128, intermediate_size=192)
    plan = prune(model, ratio=0.2, calib=_calibration(), structures="mlp", round_to=32, spsa_steps=2,
                 dry_run=True).plan
    assert {len(p.channels) for p in plan.layers} <= {32 * k for k in range(1, 7)}
    assert abs(plan.achieved_ratio - 0.2) < 0.02
    with pytest.raises(UsageError, match=r"--round-to 96 cannot reach --ratio 0\.05") as info:
        prune(model, ratio=0.05, calib=_calibration(), structures="mlp", round_to=96, spsa_steps=2,
              dry_run=True)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="--allocation uniform"):
        prune(model, ratio=0.2, calib=_calibration(), structures="layers", allocation="global", dry_run=True)


def test_cli_structures_and_round_to(tmp_path, calib_file) -> None:
    from conftest import tiny_tokenizer
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    register_commands()
    model = deep_model("llama", layers=4)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    base = ["prune", "-m", str(tmp_path / "dense"), "--calib", str(calib_file), "--calib-samples", "2",
            "--seq-len", "8", "--spsa-steps", "2", "-q"]
    out = str(tmp_path / "o")
    ok = CliRunner().invoke(app, [*base, "--structures", "layers", "--ratio", "0.2", "-o", out])
    assert ok.exit_code == 0, ok.output
    meta = json.loads((tmp_path / "o" / "minillm.json").read_text())
    assert meta["recipe"]["structures"] == "layers" and meta["plan"]["kept_layers"]
    bad = CliRunner().invoke(app, [*base, "--structures", "attn,width", "--dry-run"])
    assert bad.exit_code == 2 and "--structures" in bad.output


def test_layer_loss_scores_equal_full_passes_with_each_layer_skipped() -> None:
    from minillm.axes_stats import layer_loss_scores

    model = deep_model("qwen3", layers=4)
    calibration = CalibrationSet(random_ids(4, 10, seed=2), batch_size=2)

    def loss(skipped: list[int]) -> float:
        layers = model.model.layers
        hooks = [layers[i].register_forward_hook(lambda m, a, k, out: a[0] if a else k["hidden_states"],
                                                 with_kwargs=True) for i in skipped]
        total = count = 0.0
        with torch.no_grad():
            for batch in calibration.batches():
                tokens = batch.numel() - batch.shape[0]
                total += float(model(batch, labels=batch, use_cache=False).loss) * tokens
                count += tokens
        for h in hooks:
            h.remove()
        return total / count

    scores = layer_loss_scores(model, adapter_for(model.config), calibration, [0, 2, 3])
    dense = loss([])
    assert sorted(scores) == [0, 2, 3]
    for i, score in scores.items():
        assert score == pytest.approx(loss([i]) - dense, abs=1e-5)
