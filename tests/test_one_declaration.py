"""One declaration of every option (the Recipe), one cut, one export (issue 14).

The command line's prune options are generated from the Recipe's fields (a new field is a new flag);
``compare`` builds one Recipe per matrix cell and plans and cuts it with prune's functions; in memory
and offloaded, the cut is :func:`minillm.cut.apply_cut` (the shard writer runs it block by block).
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
import yaml
from conftest import random_ids, tiny_model, tiny_tokenizer, write_text
from helpers import offloaded
from pydantic import Field
from typer.testing import CliRunner

import minillm.commands.recipe as recipe_options
from minillm.api import prune
from minillm.calibration.data import CalibrationSet
from minillm.cli import INVOCATION_OPTIONS, app, register_commands
from minillm.recipe import Recipe


def _params(command: str) -> dict[str, Any]:
    register_commands()
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def test_every_recipe_field_is_a_prune_option_with_its_help_default_and_choices():
    params = _params("prune")
    fields = {name: f for name, f in Recipe.model_fields.items() if recipe_options.on_command_line(name)}
    assert set(params) - set(INVOCATION_OPTIONS) == set(fields)
    for name, field in fields.items():
        param = params[name]
        assert param.help == field.description, name
        assert param.default == field.get_default(call_default_factory=True), name
        if typing.get_origin(field.annotation) is Literal:
            assert param.metavar == "[" + "|".join(typing.get_args(field.annotation)) + "]", name
    assert "criterion_options" not in params and "description" not in params  # a mapping, free text
    # the short aliases and single-sided switches the Recipe declares
    assert {"-m", "--model"} <= set(params["model"].opts) and {"-o", "--out"} <= set(params["out"].opts)
    assert params["streaming"].secondary_opts == []
    assert params["overwrite"].secondary_opts == ["--no-overwrite"]


def test_a_new_recipe_field_becomes_an_option_without_touching_the_command(monkeypatch):
    class Wider(Recipe):
        sparsity_warmup: int = Field(3, ge=0, description="A setting added only to the Recipe.")
        flavour: Literal["plain", "fancy"] = Field("plain", description="A choice.")

    monkeypatch.setattr(recipe_options, "Recipe", Wider)
    seen: dict[str, Any] = {}
    demo = typer.Typer()

    @demo.command()
    @recipe_options.with_recipe_options(only=("ratio", "sparsity_warmup", "flavour"))
    def run(**settings: Any) -> None:
        seen.update(settings)

    @demo.command()
    def other() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    params = {p.name: p for p in typer.main.get_command(demo).commands["run"].params}
    assert params["sparsity_warmup"].help == "A setting added only to the Recipe."
    assert params["sparsity_warmup"].default == 3 and params["flavour"].metavar == "[plain|fancy]"
    result = CliRunner().invoke(demo, ["run", "--sparsity-warmup", "5", "--flavour", "fancy"])
    assert result.exit_code == 0, result.output
    assert seen == {"ratio": 0.2, "sparsity_warmup": 5, "flavour": "fancy"}


def test_loading_options_of_other_commands_come_from_the_recipe():
    for command in ("eval", "recover", "bench", "inspect"):
        params = _params(command)
        for name in ("dtype", "device_map", "trust_remote_code", "force"):
            if name in params:
                assert params[name].help == Recipe.model_fields[name].description, (command, name)


def test_compare_builds_one_recipe_per_cell_and_cuts_it_like_prune(tmp_path: Path, monkeypatch):
    import minillm.api
    from minillm.compare import compare

    cut_cells: list[Recipe] = []
    real_cut = minillm.api.cut_as

    def spy(recipe, *args, **kwargs):
        cut_cells.append(recipe)
        return real_cut(recipe, *args, **kwargs)

    monkeypatch.setattr(minillm.api, "cut_as", spy)
    text = write_text(tmp_path / "text.txt", words=2000)
    base = Recipe(calib=str(text), calib_samples=4, seq_len=16, batch_size=2, compensation="bias",
                  skip_first=1)
    result = compare(tiny_model("llama"), base, methods=["magnitude", "wanda-sp"], ratios=[0.1, 0.2],
                     allocations=["uniform"], tokenizer=tiny_tokenizer(), isolate=False, spsa_steps=1)
    assert all(isinstance(cell, Recipe) for cell in cut_cells)
    assert [(c.criterion, c.ratio, c.allocation) for c in cut_cells] == [
        ("magnitude", 0.1, "uniform"), ("magnitude", 0.2, "uniform"),
        ("wanda-sp", 0.1, "uniform"), ("wanda-sp", 0.2, "uniform")]
    for cell in cut_cells:  # the base recipe and the keyword overrides reach every cell
        assert (cell.compensation, cell.skip_first, cell.spsa_steps, cell.calib_samples) == ("bias", 1, 1, 4)
    assert len(result.rows) == 4 and result.protocol["compensation"] == "bias"


def test_compare_takes_a_recipe_file_as_its_base(tmp_path: Path):
    register_commands()
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tmp_path / "nowhere"), "calib_samples": 4}))
    # the model comes from the recipe: the first error is the misspelt method, before any loading
    result = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--methods", "tayler-gate",
                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "did you mean 'taylor-gate'" in result.output.lower()
    recipe.write_text(yaml.safe_dump({"model": "m", "spsa_step": 2}))
    result = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--methods", "random"])
    assert result.exit_code == 2 and "spsa_steps" in result.output
    result = CliRunner().invoke(app, ["compare", "--methods", "random"])
    assert result.exit_code == 2 and "--model" in result.output
    assert not (tmp_path / "cmp").exists()


def _spy_cuts(monkeypatch) -> list[list[int] | None]:
    """Record every call of the one cut (:func:`minillm.cut.apply_cut`), wherever it is called from."""
    import minillm.cut
    import minillm.streaming_export

    calls: list[list[int] | None] = []
    real = minillm.cut.apply_cut

    def spy(*args, layers=None, **kwargs):
        calls.append(layers)
        return real(*args, layers=layers, **kwargs)

    monkeypatch.setattr(minillm.cut, "apply_cut", spy)
    monkeypatch.setattr(minillm.streaming_export, "apply_cut", spy)
    return calls


@pytest.mark.parametrize("where", ["resident", "offloaded"])
def test_one_cut_in_memory_and_block_by_block(tmp_path: Path, monkeypatch, where: str):
    calls = _spy_cuts(monkeypatch)
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    if where == "offloaded":
        model = offloaded(model, tmp_path / "ckpt")
    calib = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    settings = Recipe(ratio=0.3, criterion="wanda-sp", compensation="bias", description="bias, 0.3")
    result = prune(model, settings, calib=calib, out=tmp_path / "out", tokenizer=tiny_tokenizer(),
                   streaming=where == "offloaded")
    blocks = len(dense.model.layers)
    # with --compensation bias a meta skeleton is cut first, to count the biases the export will carry
    # (a plan they keep from shrinking is refused before compensation); then the whole model (resident)
    # or the meta skeleton (offloaded) is cut once by the same function; offloaded, the shard writer
    # cuts each block with it again as it writes the block's weights
    count = [None]
    assert calls == count + ([None] if where == "resident" else [None, *([i] for i in range(blocks))])
    stored = result.metadata["recipe"]
    assert stored == Recipe.from_dict(stored).to_dict() and set(stored) == set(Recipe.model_fields)
    assert (stored["description"], stored["compensation"], stored["out"]) == ("bias, 0.3", "bias",
                                                                               str(tmp_path / "out"))
