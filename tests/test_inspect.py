"""inspect: parameter counts equal the real model's, per part; reachable ratios; exports show their plan."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from minillm.api import count_parameters
from minillm.arch import adapter_for
from minillm.inspect import inspect_model
from minillm.plan import LayerScores


@pytest.mark.parametrize("family", [*FAMILIES, "llama-mha-tied"])
def test_inspect_counts_equal_the_real_model(family, tmp_path):
    model = tiny_model(family) if family != "llama-mha-tied" else _tied()
    model.save_pretrained(tmp_path / "m")
    info = inspect_model(str(tmp_path / "m"))  # built on the meta device from the saved config
    assert info.total_params == count_parameters(model)
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    attention = sum(p.numel() for layer in layers for p in adapter.attention(layer).module.parameters())
    mlp = sum(
        p.numel()
        for layer in layers
        for lin in (*adapter.mlp(layer).expand, adapter.mlp(layer).closing)
        for p in lin.parameters()
    )
    embeddings = sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    )
    assert info.params_by_part["attention"] == attention
    assert info.params_by_part["mlp"] == mlp
    assert info.params_by_part["embeddings"] == embeddings
    assert sum(info.params_by_part.values()) == info.total_params
    for row, layer in zip(info.layers, layers, strict=True):
        assert row.params == sum(p.numel() for p in layer.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert info.tied_embeddings == tied
    assert info.params_by_part["lm_head"] == (0 if tied else model.get_output_embeddings().weight.numel())


def _tied():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # test-only
    return AutoModelForCausalLM.from_config(tiny_config("llama-mha-tied"), dtype=torch.float32).eval()


def _scores(info_layers, generator):
    return {
        r.layer: LayerScores(
            torch.rand(r.heads, generator=generator),
            torch.rand(r.kv_heads, generator=generator),
            torch.rand(r.channels, generator=generator),
        )
        for r in info_layers
    }


def test_reachable_ratio_is_the_planner_limit():
    """Just below the reported uniform limit the planner succeeds; just above it, it refuses."""
    from minillm.api import layer_shapes
    from minillm.errors import UsageError
    from minillm.groups import layer_costs
    from minillm.plan import build_plan

    model = tiny_model("llama")
    info = inspect_model(model)
    adapter = adapter_for(model.config)
    shapes = layer_shapes(model, adapter)
    costs = {i: layer_costs(adapter, adapter.decoder_layers(model)[i], shapes[i]) for i in shapes}
    scores = _scores(info.layers, torch.Generator().manual_seed(0))
    limit = info.reachable["attention+mlp (head_mode kv), uniform"]
    build_plan(shapes, costs, scores, info.total_params, limit - 0.01, "uniform", "kv")
    with pytest.raises(UsageError):
        build_plan(shapes, costs, scores, info.total_params, limit + 0.01, "uniform", "kv")
    mlp_only = info.reachable["mlp only, global"]
    build_plan(shapes, costs, scores, info.total_params, mlp_only - 0.01, "global", "kv", "mlp")
    with pytest.raises(UsageError):
        build_plan(shapes, costs, scores, info.total_params, mlp_only + 0.01, "global", "kv", "mlp")


def test_inspect_an_export_shows_its_plan(tmp_path, calib_file):
    from minillm.api import prune

    model = tiny_model("llama")
    result = prune(
        model,
        ratio=0.3,
        allocation="global",
        out=tmp_path / "out",
        calib=str(calib_file),
        tokenizer=tiny_tokenizer(),
        calib_samples=4,
        seq_len=16,
        spsa_steps=1,
        device_map=None,
    )
    # per-layer widths: built through the export's remote code, which runs only when asked (issue 19)
    info = inspect_model(str(tmp_path / "out"), trust_remote_code=True)
    assert info.total_params == result.plan.params_after
    assert [(r.heads, r.kv_heads, r.channels) for r in info.layers] == [
        (len(p.heads), len(p.kv_heads), len(p.channels)) for p in result.plan.layers
    ]
    assert info.export["plan"]["allocation"] == "global" and info.export["recipe"]["ratio"] == 0.3
    from minillm.cli import app, register_commands

    register_commands()
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "out"), "--json", str(tmp_path / "i.json"),
                                   "--trust-remote-code"])
    assert out.exit_code == 0, out.output
    assert "minillm export" in out.output and "attention+mlp" in out.output
    assert json.loads((tmp_path / "i.json").read_text())["total_params"] == result.plan.params_after


def test_inspect_missing_folder_is_one_line(tmp_path):
    from minillm.cli import app, register_commands

    register_commands()
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "does not exist" in out.output


@pytest.mark.parametrize("family", ["gemma3-1kv", "phi3", "gpt_neox", "olmo2", "cohere", "granite"])
def test_inspect_every_family_counts_and_describes_its_groups(family, tmp_path):
    """Fused projections, per-head norms, tied heads and scaled embeddings: every distinct parameter is
    counted once and in one part, and the recognised structure says what a cut touches."""
    from conftest import MATRIX

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    info = inspect_model(str(tmp_path / "m"))
    assert info.total_params == count_parameters(model) == sum(info.params_by_part.values())
    assert info.params_by_part["other"] == 0
    text = info.structure
    assert MATRIX[family].model_type == info.model_type
    expected = {
        "gemma3-1kv": ("attention cuts", "query heads only"),
        "phi3": ("mlp", "fused gate_up_proj"),
        "gpt_neox": ("attention", "fused query_key_value"),
        "olmo2": ("head norms", "q_norm (over all heads, sliced)"),
        "cohere": ("head norms", "q_norm (per head, sliced)"),
        "granite": ("mlp", "gate_proj + up_proj → down_proj"),
    }[family]
    assert expected[1] in text[expected[0]], text
    assert info.reachable["attention+mlp (head_mode query), uniform"] > info.reachable["mlp only, uniform"]
