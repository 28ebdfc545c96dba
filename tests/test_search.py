"""Architecture search (issue 17, ``prune --search``): every candidate is on budget and a stock config, the
ranking holds out windows no compensation saw, and the chosen export is exactly a direct prune to the
winning architecture."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_ids
from helpers import record_search_windows, search_calibration, search_model

from minillm.api import count_parameters, layer_shapes, prune
from minillm.arch import adapter_for
from minillm.errors import UsageError
from minillm.plan import LayerScores
from minillm.search import (
    SEARCH_TOLERANCE,
    Architecture,
    build_space,
    enumerate_candidates,
    split_windows,
)

AXES = frozenset({"attn", "mlp", "hidden", "layers"})


def flat_space(model: torch.nn.Module):
    adapter = adapter_for(model.config)
    shapes = layer_shapes(model, adapter)
    scores = {i: LayerScores(torch.rand(s.num_heads), torch.rand(s.num_kv_heads), torch.rand(s.intermediate))
              for i, s in shapes.items()}
    hidden = torch.rand(model.config.hidden_size)
    return build_space(model, adapter, shapes, scores, hidden, {i: float(i) for i in shapes},
                       count_parameters(model))


def test_every_candidate_is_on_budget_and_a_stock_config() -> None:
    from transformers import AutoModelForCausalLM

    model = search_model(layers=4)
    candidates = enumerate_candidates(flat_space(model), 0.25, AXES, round_to=8)
    archs = [c.architecture for c in candidates]
    base = model.config
    # the grid reaches every axis: depth, kv groups, query heads per group, hidden size
    assert any(a.layers < 4 for a in archs) and any(a.kv_heads < 2 for a in archs)
    assert any(a.heads // a.kv_heads < 2 for a in archs) and any(a.hidden < 128 for a in archs)
    assert len(set(archs)) == len(archs)
    for candidate in candidates:
        a = candidate.architecture
        assert abs(candidate.ratio - 0.25) <= SEARCH_TOLERANCE
        assert a.mlp % 8 == 0 and a.hidden % 8 == 0 and a.hidden % a.heads == 0
        config = copy.deepcopy(base)
        config.update(dict(hidden_size=a.hidden, head_dim=base.head_dim, num_attention_heads=a.heads,
                           num_key_value_heads=a.kv_heads, intermediate_size=a.mlp,
                           num_hidden_layers=a.layers))
        stock = AutoModelForCausalLM.from_config(type(base).from_dict(config.to_dict()))
        assert count_parameters(stock) == candidate.params, a


def test_no_candidate_on_budget_is_refused_in_one_line() -> None:
    model = search_model(layers=2)
    with pytest.raises(UsageError, match=r"no uniform architecture is within ±2 % of --ratio 0\.1") as info:
        enumerate_candidates(flat_space(model), 0.1, frozenset({"layers"}))
    assert "\n" not in str(info.value) and "--structures attn,mlp,hidden,layers" in str(info.value)
    with pytest.raises(UsageError, match="no uniform architecture") as info:
        prune(model, ratio=0.1, calib=search_calibration(), structures="layers", search=True, dry_run=True)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="--architecture takes"):
        prune(model, ratio=0.1, calib=search_calibration(), architecture="layers=1,heads=x", dry_run=True)
    with pytest.raises(UsageError, match="--criterion obs"):
        prune(model, ratio=0.1, calib=search_calibration(), search=True, criterion="obs", dry_run=True)


def test_ranking_scores_held_out_windows_no_compensation_saw(monkeypatch) -> None:
    calib = search_calibration(8)
    fit, held = split_windows(calib, 8)
    assert (fit.input_ids.shape[0], held.input_ids.shape[0]) == (6, 2)
    assert torch.equal(held.input_ids, calib.input_ids[-2:])
    every_fit, every_held = split_windows(calib, None)  # the default: the whole calibration set
    assert torch.equal(every_fit.input_ids, fit.input_ids)
    assert torch.equal(every_held.input_ids, held.input_ids)
    fewer_fit, fewer_held = split_windows(calib, 4)  # a subset: its first 3 fit, the set's last one held out
    assert torch.equal(fewer_fit.input_ids, calib.input_ids[:3])
    assert torch.equal(fewer_held.input_ids, calib.input_ids[-1:])
    seen = record_search_windows(monkeypatch)
    result = prune(search_model(), ratio=0.25, calib=calib, structures="attn,mlp,layers", round_to=8,
                   search=True, search_calib_samples=8, max_candidates=2, spsa_steps=2, dry_run=True)
    record = result.plan.extra["search"]
    assert record["ranked"] == 2 and record["held_out_windows"] == 2
    assert sorted(r["rank"] for r in record["candidates"] if r["rank"]) == [1, 2]
    assert len(seen["scored"]) == 2
    held_rows = {tuple(row.tolist()) for row in calib.input_ids[-2:]}
    for ids in seen["scored"]:
        assert {tuple(row.tolist()) for row in ids} == held_rows
    for ids in seen["compensated"]:
        assert not held_rows & {tuple(row.tolist()) for row in ids}


def test_search_export_equals_a_direct_prune_to_the_winner_and_reports_the_table(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    settings = dict(ratio=0.25, structures="attn,mlp,hidden,layers", round_to=8, spsa_steps=2, seed=0)
    searched = prune(search_model(), calib=search_calibration(), search=True, max_candidates=3,
                     search_calib_samples=8, out=tmp_path / "searched", report=tmp_path / "report.html",
                     **settings)
    best = searched.plan.extra["architecture"]
    record = searched.plan.extra["search"]
    assert record["best"] == best and Architecture.parse(best)
    direct = prune(search_model(), calib=search_calibration(), architecture=best, out=tmp_path / "direct",
                   **settings)
    ids = random_ids(2, 12, seed=5)
    outputs = []
    for folder in ("searched", "direct"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
        assert not (tmp_path / folder / "modeling_minillm.py").exists()
        with torch.no_grad():
            outputs.append(reloaded(ids).logits)
    assert torch.equal(outputs[0], outputs[1])
    assert searched.plan.params_after == direct.plan.params_after
    meta = json.loads((tmp_path / "searched" / "minillm.json").read_text())
    assert meta["recipe"]["architecture"] == best and meta["recipe"]["search"] is False
    assert meta["plan"]["extra"]["search"]["candidates"] == record["candidates"]
    page = (tmp_path / "report.html").read_text()
    assert "Architecture search" in page and best in page and "held-out loss" in page


def test_cli_search_prints_the_candidate_table(tmp_path, calib_file) -> None:
    from conftest import tiny_tokenizer
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    register_commands()
    search_model().save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    base = ["prune", "-m", str(tmp_path / "dense"), "--calib", str(calib_file), "--calib-samples", "4",
            "--seq-len", "8", "--spsa-steps", "2", "--ratio", "0.25", "--round-to", "8", "--search",
            "--max-candidates", "2", "--structures", "attn,mlp,layers"]
    ok = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    assert "architecture search" in ok.output and "held-out loss" in ok.output
    bad = CliRunner().invoke(app, [*base, "--structures", "layers", "--ratio", "0.05", "--dry-run"])
    assert bad.exit_code == 2 and "no uniform architecture" in bad.output


def test_after_one_candidate_per_depth_the_rest_goes_to_the_best_depth() -> None:
    from minillm.search import choose, refine

    model = search_model(layers=4)
    space = flat_space(model)
    found = enumerate_candidates(space, 0.25, AXES, round_to=8)
    depths = sorted({c.architecture.layers for c in found}, reverse=True)
    first = choose(found, space, AXES, len(depths))
    assert [c.architecture.layers for c in first] == depths  # one per depth, fewest removed first
    for position, candidate in enumerate(first):  # pretend the second-deepest cut measured best
        candidate.loss = 1.0 if position == 1 else 2.0 + position
    best_depth = first[1].architecture.layers
    more = refine(found, first, space, AXES, 3)
    at_best = [c for c in found if c.architecture.layers == best_depth and c not in first]
    assert more == at_best[:3] or (len(at_best) < 3 and more[: len(at_best)] == at_best)
    assert not {id(c) for c in more} & {id(c) for c in first}
