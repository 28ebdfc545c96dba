"""``prune --search --search-data`` (issue 17): the candidates are ranked on windows of a text the user
gives, each compensated on every calibration window (what the final prune compensates on), and the
export's recipe, the search table and the report name that text."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer, write_text
from helpers import record_search_windows, search_calibration, search_model

from minillm.api import prune
from minillm.calibration.data import calibration_set
from minillm.calibration.forward import mean_loss
from minillm.errors import UsageError
from minillm.recipe import Recipe

SETTINGS = dict(ratio=0.25, structures="attn,mlp,layers", round_to=8, spsa_steps=2, seed=0)


def test_the_search_data_ranks_and_every_calibration_window_compensates(tmp_path, monkeypatch) -> None:
    calib = search_calibration(8)
    text = write_text(tmp_path / "valid.txt", words=400, seed=7)
    held = calibration_set(tiny_tokenizer(), str(text), 6, 16, 0, 2)  # loaded as --calib is: seeded windows
    seen = record_search_windows(monkeypatch)
    result = prune(search_model(), calib=calib, tokenizer=tiny_tokenizer(), search=True, max_candidates=2,
                   search_data=str(text), search_data_samples=6, dry_run=True, **SETTINGS)
    monkeypatch.undo()
    record = result.plan.extra["search"]
    assert record["ranked"] == 2 and len(seen["scored"]) == 2 and seen["compensated"]
    for ids in seen["scored"]:  # the ranking reads the search text's windows, nothing of the calibration set
        assert torch.equal(ids, held.input_ids)
    for ids in seen["compensated"]:  # and every candidate is compensated on all 8 calibration windows
        assert torch.equal(ids, calib.input_ids)
    assert (record["fit_windows"], record["held_out_windows"]) == (8, 6)
    assert record["held_out"] == f"6 windows of --search-data {text}" and record["search_data"] == str(text)
    assert record["fit"] == "all 8 calibration windows"
    ranked = [row for row in record["candidates"] if row["rank"] is not None]
    for row in ranked:  # each recorded loss is the mean loss on those windows of that compensated candidate
        label = ",".join(f"{k}={row[k]}" for k in ("layers", "heads", "kv_heads", "hidden", "mlp"))
        direct = prune(search_model(), calib=calib, architecture=label, **SETTINGS)
        assert row["loss"] == pytest.approx(mean_loss(direct.model, held), abs=1e-5)
    # and with the search text the ranking differs in data from the default split (last quarter held out)
    default = prune(search_model(), calib=calib, search=True, max_candidates=2, dry_run=True, **SETTINGS)
    assert default.plan.extra["search"]["held_out"] == "last 2 of 8 calibration windows"
    assert default.plan.extra["search"]["search_data"] is None


def test_search_data_refusals_are_one_line(tmp_path) -> None:
    text = write_text(tmp_path / "valid.txt", words=400, seed=7)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5\n")
    cases = [
        (dict(search_data=str(text)), "--search-data ranks the candidates of --search: add --search"),
        (dict(search=True, search_data_samples=4), "--search-data-samples sets how many windows"),
        (dict(search=True, search_data=str(short)),
         rf"--search-data '{short}' has 6 tokens, fewer than --seq-len 16; give more text"),
    ]
    for options, message in cases:
        with pytest.raises(UsageError, match=message) as info:
            prune(search_model(), calib=search_calibration(), tokenizer=tiny_tokenizer(), dry_run=True,
                  **{**SETTINGS, **options})
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="is the --calib text: the ranking text must be held out") as info:
        prune(search_model(), calib=str(text), tokenizer=tiny_tokenizer(), search=True, search_data=str(text),
              seq_len=16, calib_samples=4, dry_run=True, **SETTINGS)
    assert "\n" not in str(info.value)


def test_cli_names_the_search_data_in_the_table_report_and_exports_recipe(tmp_path, calib_file) -> None:
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    register_commands()
    search_model().save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    text = write_text(tmp_path / "valid.txt", words=400, seed=7)
    base = ["prune", "-m", str(tmp_path / "dense"), "--calib", str(calib_file), "--calib-samples", "4",
            "--seq-len", "8", "--spsa-steps", "2", "--ratio", "0.25", "--round-to", "8",
            "--max-candidates", "2", "--structures", "attn,mlp,layers"]
    refused = CliRunner().invoke(app, [*base, "--search-data", str(text), "--dry-run"])
    assert refused.exit_code == 2 and "--search-data ranks the candidates of --search" in refused.output
    ok = CliRunner().invoke(app, [*base, "--search", "--search-data", str(text), "--search-data-samples", "5",
                                  "-o", str(tmp_path / "o"), "--report", str(tmp_path / "report.html")])
    assert ok.exit_code == 0, ok.output
    title = " ".join(ok.output.split())  # (the table's title wraps at the table's width)
    assert "(5 windows of --search-data" in title and "compensated on all 4 calibration windows)" in title
    assert f"5 windows of --search-data {text}" in (tmp_path / "report.html").read_text()
    meta = json.loads((tmp_path / "o" / "minillm.json").read_text())
    recipe = meta["recipe"]
    assert (recipe["search_data"], recipe["search_data_samples"]) == (str(text), 5)
    assert recipe["search"] is False and recipe["architecture"] == meta["plan"]["extra"]["architecture"]
    assert meta["plan"]["extra"]["search"]["held_out"] == f"5 windows of --search-data {text}"
    # the recorded recipe replays the chosen architecture (it does not read the search text again)
    replay = prune(search_model(), Recipe.load(tmp_path / "o"), calib=search_calibration(), dry_run=True)
    assert replay.plan.extra["architecture"] == recipe["architecture"]


def test_compare_cells_search_on_the_search_data_as_prune_does(tmp_path, monkeypatch) -> None:
    import minillm.calibration.forward as forward
    from minillm.compare import compare

    calib = write_text(tmp_path / "calib.txt")
    text = write_text(tmp_path / "valid.txt", words=400, seed=7)
    common = dict(calib=str(calib), calib_samples=4, seq_len=16, batch_size=2, tokenizer=tiny_tokenizer(),
                  search=True, search_data=str(text), max_candidates=2,
                  **{**SETTINGS, "structures": "attn,mlp"})  # (compare scores no layers or hidden channels)
    with pytest.raises(UsageError, match="--search-data ranks the candidates of --search"):
        compare(search_model(), methods=["flap"], **{**common, "search": False})
    scored: list[torch.Tensor] = []
    loss = forward.mean_loss

    def recording_loss(model, windows):
        scored.append(windows.input_ids)
        return loss(model, windows)

    monkeypatch.setattr(forward, "mean_loss", recording_loss)
    result = compare(search_model(), methods=["flap"], ratios=[0.25], allocations=["uniform"], isolate=False,
                     **{k: v for k, v in common.items() if k != "ratio"})
    monkeypatch.undo()
    held = calibration_set(tiny_tokenizer(), str(text), 4, 16, 0, 2).input_ids
    assert sum(torch.equal(ids, held) for ids in scored) == 2  # the two candidates, ranked on the text
    searched = prune(search_model(), criterion="flap", **common)
    assert [r.params for r in result.rows if r.method == "flap"] == [searched.plan.params_after]
    assert searched.plan.extra["search"]["held_out"] == f"4 windows of --search-data {text}"
