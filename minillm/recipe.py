"""Recipes: one validated schema holding everything ``minillm prune`` takes, as YAML or JSON.

Why: a pruning run has ~20 settings; a recipe file names them once, is reviewed like code, and every
export stores the fully resolved recipe in ``minillm.json`` (under ``"recipe"``), so
``minillm prune --recipe pruned/minillm.json --out again`` reproduces a run. Flags given on the command
line override the recipe. Modelled on llm-compressor's recipes: pydantic with ``extra="forbid"``, and
unknown keys fail with a "did you mean …?" naming the closest field.

This is the one declaration of every option: the ``prune`` command's options (flag, default, help,
choices) are generated from these fields (:mod:`minillm.commands.recipe`), ``compare`` builds one
recipe per matrix cell, the Python API validates through it and an export stores its dump. Only
``--recipe`` itself and the logging flags ``-v/-q`` are about the invocation rather than the run.

A recipe says *what* to prune, never where to write, whether to replace, or whether to run code: the
fields in :data:`minillm.output_guard.COMMAND_LINE_ONLY` (``out``, ``overwrite``, ``force``, ``report``,
``offload_dir``, ``trust_remote_code``) are taken from the command line only. A recipe file that sets
them is still read (an export's ``minillm.json`` records ``out``) and a one-line notice on stderr says
they were ignored.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minillm.defaults import (
    DEFAULT_COMPENSATION,
    DEFAULT_CRITERION,
    DEFAULT_DAMPING,
    DEFAULT_HEAD_MODE,
    Allocation,
    Compensation,
    CompensationTarget,
    Precision,
)
from minillm.errors import UsageError

RECIPE_KEY = "recipe"  # where an export's minillm.json keeps the resolved recipe


class Recipe(BaseModel):
    """The complete, validated settings of one ``minillm prune`` run (field = CLI option, ``-`` → ``_``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    description: str = Field("", description="Free text: what this recipe reproduces (ignored by the run).",
                             json_schema_extra={"cli": False})
    model: str | None = Field(None, description="Hub id, local HF folder, or .gguf file.",
                              json_schema_extra={"flags": ["--model", "-m"]})
    ratio: float = Field(
        0.2, gt=0.0, lt=1.0, description="Fraction of the model's total parameters to remove."
    )
    out: str | None = Field(None, description="Export folder (required unless --dry-run).",
                            json_schema_extra={"flags": ["--out", "-o"]})
    criterion: str = Field(DEFAULT_CRITERION, description="Scoring criterion (see `minillm criteria`).")
    allocation: Allocation = Field(
        "uniform", description="uniform widths (stock config), or per-layer widths (remote code): global "
        "ranking, log (SlimGPT's log-increasing ratios) or error (least refit error per parameter)."
    )
    head_mode: Literal["auto", "kv", "query"] = Field(
        DEFAULT_HEAD_MODE, description="kv: remove whole key/value groups; query: query heads evenly in "
        "every kv group (all kv heads kept); auto: query when every layer has a single key/value head, "
        "else kv."
    )
    structures: str = Field(
        "both", description="What to prune: a comma list of attn, mlp, hidden, layers (both = attn,mlp), "
        "e.g. attn,mlp,hidden or layers."
    )
    round_to: int = Field(
        1, ge=1, description="MLP width and hidden size in multiples of N (64/128 suit GPU kernels)."
    )
    layer_score: Literal["influence", "loss"] = Field(
        "influence", description="Layer score for --structures layers: influence (ShortGPT 1 - cos(h_in, "
        "h_out)) or loss (calibration loss change when skipped)."
    )
    search: bool = Field(
        False, description="Rank the uniform architectures within ±2 % of --ratio (layers kept, heads per kv "
        "group, kv groups, hidden size; MLP width solved) by held-out calibration loss after compensation "
        "and prune to the best; --structures names the axes it may cut."
    )
    search_calib_samples: int | None = Field(
        None, ge=2, description="--search: windows per candidate (default: all --calib-samples, so each "
        "candidate is compensated on as much data as the final prune); the last quarter of them (taken from "
        "the end of the calibration set) is held out for the loss, the rest is compensated on (with "
        "--search-data all of them are)."
    )
    search_data: str | None = Field(
        None, description="--search: rank the candidates by mean loss on windows of this text "
        "(.txt/.jsonl/.json file or dataset name, read like --calib; e.g. a validation split, never your "
        "test text) instead of the calibration set's last quarter; each candidate is then compensated on "
        "every calibration window, as the final prune is."
    )
    search_data_samples: int | None = Field(
        None, ge=1, description="--search-data: windows of --seq-len tokens taken from it at --seed's "
        "random offsets, as calibration windows are (default: as many as --calib-samples)."
    )
    max_candidates: int = Field(12, ge=1, description="--search: most candidates ranked (each one "
                                "compensated and evaluated on a copy of the model).")
    architecture: str | None = Field(
        None, description="Prune to this uniform architecture, e.g. layers=28,heads=6,kv_heads=3,hidden=576,"
        "mlp=1280 (what --search chose; its export's recipe records it)."
    )
    skip_first: int = Field(0, ge=0, description="Keep the first N decoder layers whole.")
    skip_last: int = Field(0, ge=0, description="Keep the last N decoder layers whole.")
    calib: str = Field("wikitext2", description="Calibration text: .txt/.jsonl/.json file or dataset name.")
    calib_samples: int = Field(
        128, ge=1, description="Number of calibration windows of --seq-len tokens (128 measured best with "
        "the refit)."
    )
    seq_len: int = Field(128, ge=2, description="Tokens per calibration (and compare's perplexity) window.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    seed: int = Field(0, description="Seed for calibration sampling and SPSA perturbations.")
    spsa_steps: int = Field(
        16, ge=1, description="SPSA perturbations (2 forward passes each); fwd-grad: forward-mode passes."
    )
    spsa_eps: float = Field(1e-3, gt=0.0, description="SPSA perturbation size.")
    criterion_options: dict[str, Any] = Field(
        default_factory=dict, description="Criterion-specific settings (recipe and Python API only).",
        json_schema_extra={"cli": False},
    )
    compensation: Compensation = Field(
        DEFAULT_COMPENSATION,
        description="After the cut, block by block on the pruned prefix: refit (least squares on o_proj / "
        "down_proj), bias (FLAP's mean folding into a bias) or none.",
    )
    compensation_target: CompensationTarget = Field(
        "pruned", description="What the refit fits: each layer's own output on the pruned prefix's inputs "
        "(pruned), the dense model's output of that layer (dense: one more pass per block and a dense "
        "stream; attn/mlp cuts only), or for the MLP the dense block's output on the pruned prefix's input "
        "(block: down_proj also makes up for the same block's attention cut; one more pass per block)."
    )
    reselect: bool = Field(
        True, description="flap with the refit: re-choose each layer's heads and channels (the plan's "
        "counts) by FLAP's fluctuation on the pruned prefix during the compensation pass (--no-reselect: "
        "the dense model's choice, which --compensation bias always keeps; obs always re-chooses)."
    )
    damping: float = Field(
        DEFAULT_DAMPING, ge=0.0, description="λ of the compensation's H + λ·mean(diag H)·I."
    )
    compensation_precision: Precision = Field(
        "auto",
        description="dtype of the compensation's moments H: float64, float32 (half the memory of the "
        "solve) or auto (float64, unless --streaming under --max-memory would leave under half the cap "
        "for weights). The export's recipe records the dtype used.",
    )
    device_map: str | dict[str, Any] | None = Field(
        "auto", description="accelerate device map: auto, balanced, cpu, cuda:0, …"
    )
    max_memory: str | dict[str, Any] | None = Field(
        None, description="Per-device memory cap, e.g. 0=20GiB,cpu=30GiB."
    )
    dtype: str = Field("auto", description="auto (the checkpoint's), float32, bfloat16, float16.")
    overwrite: bool = Field(
        False, description="Replace --out if it is a minillm export (or empty). Command line only."
    )
    force: bool = Field(
        False, description="With --overwrite: replace --out even if it is not a minillm export. "
        "Command line only.", json_schema_extra={"flags": ["--force"]}
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the model folder (per-layer minillm exports need it); "
        "only for folders you trust.", json_schema_extra={"flags": ["--trust-remote-code"]}
    )
    dry_run: bool = Field(False, description="Score and print the plan as JSON; write nothing.")
    max_shard_size: str | int = Field("5GB", description="Largest safetensors shard.")
    streaming: bool = Field(
        False, description="Load with accelerate offload so --max-memory can be below the model size; any "
        "criterion then scores and exports one decoder block at a time (see docs/benchmarks.md).",
        json_schema_extra={"flags": ["--streaming"]},
    )
    offload_dir: str | None = Field(
        None, description="Folder for accelerate's disk offload (default: temporary). Command line only."
    )
    report: str | None = Field(
        None, description="Write an HTML report (plots as PNGs beside it), e.g. report.html. "
        "Command line only."
    )

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        """Validate ``data``; any problem becomes one :class:`UsageError` line naming the key."""
        if not isinstance(data, dict):
            raise UsageError(f"{source}: a recipe is a mapping of settings (got {type(data).__name__})")
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        try:
            return cls.model_validate(normalised)
        except ValidationError as exc:
            raise UsageError(f"{source}: {_explain(exc, as_flags=source == 'command line')}") from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a ``.yaml``/``.yml`` or ``.json`` recipe, or an export's ``minillm.json`` (or its folder)."""
        file = Path(path)
        if file.is_dir():
            file = file / "minillm.json"
        if not file.is_file():
            raise UsageError(
                f"recipe {str(path)!r} does not exist; pass a recipes/*.yaml file or an export's minillm.json"
            )
        import yaml

        text = file.read_text()
        try:
            data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"cannot parse recipe {str(file)!r}: {first}") from None
        if data is None:
            raise UsageError(f"recipe {str(file)!r} is empty")
        if isinstance(data, dict) and "minillm_version" in data:  # an export's minillm.json
            data = _from_export_metadata(data, str(file))
        if isinstance(data, dict):
            data = _without_command_line_only(data, str(file))
        return cls.from_dict(data, source=str(file))

    @classmethod
    def resolve(cls, path: str | Path | None, overrides: dict[str, Any]) -> Recipe:
        """The settings of a run: the recipe at ``path`` (or the defaults), ``overrides`` on top, checked."""
        recipe = (cls.load(path) if path else cls()).merged(overrides)
        if recipe.model is None:
            raise UsageError(
                "no model to prune: pass --model (hub id, folder or .gguf) or set `model:` in the recipe"
            )
        if recipe.out is None and not recipe.dry_run:
            raise UsageError("--out is required (or pass --dry-run to only print the plan)")
        return recipe

    # --- output -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def merged(self, overrides: dict[str, Any], source: str = "command line") -> Recipe:
        """A new recipe with ``overrides`` (e.g. flags given on the command line) applied and re-validated."""
        if not overrides:
            return self
        return Recipe.from_dict({**self.model_dump(), **overrides}, source=source)


def _without_command_line_only(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` minus the where-to-write settings, with a one-line notice if any was set."""
    from minillm.output_guard import COMMAND_LINE_ONLY

    normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
    ignored = [k for k in COMMAND_LINE_ONLY if normalised.get(k) not in (None, False, "")]
    if ignored:
        print(f"note: {source}: ignoring {', '.join(ignored)} (only the command line says where to write, "
              f"whether to overwrite and whether to run model code)", file=sys.stderr)
    return {k: v for k, v in normalised.items() if k not in COMMAND_LINE_ONLY}


def _explain(exc: ValidationError, as_flags: bool = False) -> str:
    """The validation errors as one line; unknown keys get the closest field name.

    ``as_flags`` names settings as the command line spells them (``--seq-len``), so the fix is obvious.
    """
    messages = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "recipe"
        if as_flags and error["type"] != "extra_forbidden":
            key = "--" + key.replace("_", "-")
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, Recipe.model_fields, n=1, cutoff=0.6)
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else f" (known keys: {', '.join(Recipe.model_fields)})"
            )
            messages.append(f"unknown key {key!r}{hint}")
        else:
            messages.append(f"{key}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(messages)


def _from_export_metadata(metadata: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe stored in an export; older exports without one are rebuilt from their ``options``."""
    if isinstance(metadata.get(RECIPE_KEY), dict):
        return metadata[RECIPE_KEY]
    options = metadata.get("options")
    if not isinstance(options, dict):
        raise UsageError(
            f"{source} is a minillm export without a stored recipe; pass the recipe file instead"
        )
    return {"model": metadata.get("base_model"), **options}
