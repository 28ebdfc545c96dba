"""Recipes: schema = the prune command's options, shipped recipes parse/round-trip/run, overrides, replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from conftest import tiny_config, tiny_tokenizer, write_text
from typer.testing import CliRunner

from minillm.cli import INVOCATION_OPTIONS, app
from minillm.errors import UsageError
from minillm.export import read_metadata
from minillm.plan import PrunePlan
from minillm.recipe import Recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def _prune_command():
    return typer.main.get_command(app).commands["prune"]


def _save_tiny(folder: Path, family: str, layers: int) -> Path:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers
    torch.manual_seed(0)  # test-only
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: thread hand-offs cost more than the math (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A 20-layer tiny Llama (4 query / 2 kv heads) and a calibration text.

    Recipes keep layers 0-3 and the last 2 whole, and 50% of all parameters must still fit in the other
    14 layers. Every recipe runs on it, GQA ones included (their knob is head_mode, which this model
    exercises); a tiny Qwen2 folder would load transformers' Qwen2Tokenizer, not the test tokenizer.
    """
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": _save_tiny(root / "llama", "llama", 20), "calib": write_text(root / "calib.txt")}


#: what every recipe run on a tiny model overrides: the model, data and output, and the run's size
TINY_RUN = [
    "--calib-samples",
    "4",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--spsa-steps",
    "1",
    "--device-map",
    "cpu",
    "--dtype",
    "float32",
    "--max-memory",
    "",
]


def _run(args: list[str]):
    return CliRunner().invoke(app, ["prune", *args, "-q"], catch_exceptions=False)


def test_every_prune_option_is_a_recipe_field_with_the_same_default():
    options = {p.name: p.default for p in _prune_command().params if p.name not in INVOCATION_OPTIONS}
    fields = {name: f.get_default(call_default_factory=True) for name, f in Recipe.model_fields.items()}
    fields.pop("description")
    fields.pop("criterion_options")  # Python-API only: a mapping has no single flag
    assert set(options) == set(fields)
    assert options == fields


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_parses_and_round_trips(path: Path):
    recipe = Recipe.load(path)
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    raw = yaml.safe_load(path.read_text())
    assert {k: recipe.to_dict()[k] for k in raw} == raw  # every key in the file kept its value
    assert recipe.description, "a shipped recipe says what it reproduces"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_runs_on_a_tiny_model(path: Path, tiny_models, tmp_path):
    recipe = Recipe.load(path)
    out = tmp_path / "out"
    result = _run(
        [
            "--recipe",
            str(path),
            "--model",
            str(tiny_models["llama"]),
            "--out",
            str(out),
            "--calib",
            str(tiny_models["calib"]),
            *TINY_RUN,
        ]
    )
    assert result.exit_code == 0, result.output
    stored = Recipe.from_dict(read_metadata(out)["recipe"])
    assert (stored.ratio, stored.head_mode, stored.skip_first, stored.skip_last, stored.allocation) == (
        recipe.ratio,
        recipe.head_mode,
        recipe.skip_first,
        recipe.skip_last,
        recipe.allocation,
    )
    plan = PrunePlan.from_dict(read_metadata(out)["plan"])
    untouched = list(range(recipe.skip_first)) + list(
        range(len(plan.layers) - recipe.skip_last, len(plan.layers))
    )
    config = tiny_config("llama")
    for index in untouched:
        layer = plan.layers[index]
        assert (len(layer.heads), len(layer.channels)) == (
            config.num_attention_heads,
            config.intermediate_size,
        )
    assert plan.achieved_ratio == pytest.approx(recipe.ratio, abs=0.03)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ratio: 0.3\nspsa_step: 4\n")
    with pytest.raises(UsageError, match=r"unknown key 'spsa_step' \(did you mean 'spsa_steps'\?\)"):
        Recipe.load(path)
    result = _run(["--recipe", str(path)])
    assert result.exit_code == 2
    assert "spsa_step" in result.output and "spsa_steps" in result.output


def test_bad_value_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ratio: 1.5\nhead_mode: heads\n")
    with pytest.raises(UsageError, match="ratio") as info:
        Recipe.load(path)
    assert "head_mode" in str(info.value)


def test_missing_and_unparsable_recipes_fail_cleanly(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("ratio: [0.2\n")
    with pytest.raises(UsageError, match="cannot parse"):
        Recipe.load(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        Recipe.load(tmp_path / "list.yaml")


def test_hyphenated_keys_are_accepted():
    assert Recipe.from_dict({"skip-first": 3, "head-mode": "query"}).skip_first == 3


def test_flags_override_recipe_and_export_replays(tiny_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_models["llama"]),
                "ratio": 0.2,
                "skip_first": 2,
                "allocation": "global",
                "calib": str(tiny_models["calib"]),
                "out": str(tmp_path / "from-recipe"),
            }
        )
    )
    first = tmp_path / "first"
    result = _run(["--recipe", str(recipe), "--ratio", "0.3", "--out", str(first), *TINY_RUN])
    assert result.exit_code == 0, result.output
    meta = read_metadata(first)
    stored = meta["recipe"]
    assert stored["ratio"] == 0.3  # the flag won
    assert stored["skip_first"] == 2 and stored["allocation"] == "global"  # the recipe filled the rest
    assert stored["out"] == str(first) and stored["overwrite"] is False
    assert stored["calib_samples"] == 4 and stored["spsa_steps"] == 1
    assert set(stored) == set(Recipe.model_fields)  # the full resolved recipe, not only what was given
    # replay: the stored recipe alone reproduces the same plan and weights
    again = tmp_path / "again"
    result = _run(["--recipe", str(first / "minillm.json"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert read_metadata(again)["plan"] == meta["plan"]
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replaying_into_the_same_folder_needs_overwrite(tiny_models, tmp_path):
    out = tmp_path / "o"
    args = ["--model", str(tiny_models["llama"]), "--calib", str(tiny_models["calib"]), *TINY_RUN]
    assert _run([*args, "--out", str(out)]).exit_code == 0
    # the stored `out:` is only a record: a recipe never says where to write (issue 19)
    result = _run(["--recipe", str(out)])  # a folder means its minillm.json
    assert result.exit_code == 2 and "--out is required" in result.output and "ignoring out" in result.output
    again = tmp_path / "again"
    assert _run(["--recipe", str(out), "--out", str(again)]).exit_code == 0
    result = _run(["--recipe", str(out), "--out", str(again)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_model_and_out_are_required_somewhere(tmp_path):
    result = _run(["--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--model" in result.output
    result = _run(["--model", "x"])
    assert result.exit_code == 2 and "--out" in result.output


def test_recipe_from_older_export_without_recipe(tmp_path):
    (tmp_path / "minillm.json").write_text(
        json.dumps(
            {"minillm_version": "0.1.0", "base_model": "m", "options": {"ratio": 0.25, "criterion": "fms"}}
        )
    )
    recipe = Recipe.load(tmp_path / "minillm.json")
    assert (recipe.model, recipe.ratio) == ("m", 0.25)
