"""The Python API: ``prune`` does what ``minillm prune`` does, and the CLI only calls it.

A run reads top to bottom: load → adapter → layer shapes and costs → calibration set → scores
(criterion) → plan → surgery → export.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import minillm
from minillm.arch import adapter_for
from minillm.arch.base import ArchAdapter, LayerShape
from minillm.axes_stats import score_axes
from minillm.calibration.blocks import is_offloaded
from minillm.calibration.data import CalibrationSet, calibration_set
from minillm.calibration.spsa import SpsaConfig
from minillm.card import render_card
from minillm.cut import CutResult, cut, selection
from minillm.defaults import DEFAULT_DAMPING
from minillm.errors import UsageError
from minillm.export import check_output_dir, export, needs_remote_code
from minillm.groups import count_parameters, layer_costs, prunable_layers
from minillm.memory import Measurement, measure
from minillm.plan import (
    Allocation,
    HeadMode,
    PrunePlan,
    Structures,
    build_plan,
    check_ratio,
    parse_structures,
    structures_label,
)
from minillm.report.timeline import Timeline
from minillm.scoring import CRITERIA, ScoreResult, ScoringContext
from minillm.search import check_search_options
from minillm.search_data import held_out_set
from minillm.surgery import pruned_widths

if TYPE_CHECKING:
    from minillm.recipe import Recipe

Progress = Callable[[str, int, int], None]


@dataclass
class PruneResult:
    """What a prune produced: the plan, the (pruned, unless dry run) model and the measurements."""

    plan: PrunePlan
    model: nn.Module
    score: ScoreResult
    scoring: Measurement
    total_seconds: float
    out: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    timeline: Timeline | None = None  # memory/params per stage (reports, closing timings)
    compensation: Measurement | None = None  # the sequential compensation pass (None: not run)


def layer_shapes(model: nn.Module, adapter: ArchAdapter) -> dict[int, LayerShape]:
    return {i: adapter.layer_shape(model, i) for i in range(len(adapter.decoder_layers(model)))}


def score_model(model: nn.Module, criterion: str, calibration: CalibrationSet, layers: list[int],
                seed: int = 0, spsa: SpsaConfig | None = None, options: dict[str, Any] | None = None,
                progress: Progress | None = None) -> ScoreResult:
    """Score every group of ``layers`` with the named criterion."""
    adapter = adapter_for(model.config)
    score_fn = CRITERIA.get(criterion)
    ctx = ScoringContext(
        model=model, adapter=adapter, layers=layers, shapes=layer_shapes(model, adapter),
        calibration=calibration, seed=seed, spsa=spsa or SpsaConfig(seed=seed), options=dict(options or {}),
        progress=progress,
    )
    result = score_fn(ctx)
    result.notes.setdefault("offloaded", ctx.run.offloaded)
    return result


def plan_from_scores(model: nn.Module, result: ScoreResult, ratio: float, allocation: Allocation = "uniform",
                     head_mode: HeadMode = "kv", structures: Structures | str = "both", round_to: int = 1,
                     hidden_scores: Any = None, layer_scores: dict[int, float] | None = None,
                     calibration: CalibrationSet | None = None, damping: float = DEFAULT_DAMPING,
                     progress: Progress | None = None) -> PrunePlan:
    """The plan for ``structures``: heads/channels as before, or (with hidden, layers or ``round_to``)
    the uniform all-axes planner of :mod:`minillm.plan_axes`. ``allocation="error"`` walks
    ``calibration`` once for each layer's refit-error curves (damped with ``damping``)."""
    adapter = adapter_for(model.config)
    shapes = layer_shapes(model, adapter)
    names = parse_structures(structures)
    if names & {"hidden", "layers"} or round_to != 1:
        from minillm.plan_axes import build_axes_plan

        check_axes_options(names, allocation, round_to)
        return build_axes_plan(model, adapter, shapes, result.scores, count_parameters(model), ratio, names,
                               head_mode, round_to, hidden_scores, layer_scores)
    layers = adapter.decoder_layers(model)
    costs = {i: layer_costs(adapter, layers[i], shapes[i]) for i in shapes}
    config = model.config
    curves = None
    if allocation == "error" and calibration is not None:
        from minillm.compensation.curves import reconstruction_curves

        def curves(groups: dict) -> dict:
            return reconstruction_curves(model, adapter, calibration, groups, damping, progress)
    return build_plan(shapes, costs, result.scores, count_parameters(model), ratio, allocation, head_mode,
                      structures_label(names),  # type: ignore[arg-type]
                      expressible=lambda shape: adapter.uniform_config_update(config, shape) is not None,
                      curves=curves)


def check_axes_options(names: frozenset[str], allocation: str, round_to: int) -> None:
    """Combinations the all-axes planner refuses, each in one line (checked before any work)."""
    if round_to < 1:
        raise UsageError(f"--round-to must be >= 1 (got {round_to})")
    uses_axes = bool(names & {"hidden", "layers"}) or round_to != 1
    if uses_axes and allocation != "uniform":
        raise UsageError("--structures hidden/layers and --round-to plan uniform widths only; "
                         "use --allocation uniform")


def check_compensation_target(target: str, compensation: str, names: frozenset[str], search: bool,
                              architecture: str | None) -> None:
    """The dense-output and block targets are targets of the refit; the dense one's second stream needs a
    model of the same hidden size and depth (the block target's reference is the block itself)."""
    if target == "pruned":
        return
    if compensation != "refit":
        raise UsageError(f"--compensation-target {target} is a target of the refit; use --compensation refit")
    if target == "dense" and (names & {"hidden", "layers"} or search or architecture):
        raise UsageError("--compensation-target dense compensates attn/mlp cuts only; drop hidden/layers "
                         "from --structures (and --search/--architecture) or use "
                         "--compensation-target pruned or block")


#: Recipe fields that are not settings of the pruning itself (where the result goes, replay text): they
#: are keyword arguments of :func:`prune` (command-line flags), never read from a recipe by the run.
_NOT_RUN_SETTINGS = ("description", "model", "out", "overwrite", "force", "trust_remote_code", "report",
                     "offload_dir")


def prune(
    model: str | nn.Module,
    recipe: Recipe | None = None,
    *,
    calib: str | CalibrationSet | None = None,
    tokenizer: Any = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    report: str | Path | None = None,
    offload_dir: str | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    inputs: tuple[str | Path | None, ...] = (),
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` (hub id, folder, ``.gguf`` file, or a loaded model) as ``recipe`` says.

    Every setting of the run is a field of :class:`~minillm.recipe.Recipe` (with its help text and
    validation): pass a recipe, or its fields as keyword ``overrides`` (``prune(m, ratio=0.3)``), or
    both (overrides win). ``calib`` may also be a ready :class:`CalibrationSet`. With ``out`` the pruned
    model is exported there atomically; with ``dry_run`` only the plan is made; with ``report`` an HTML
    report (and PNGs beside it) is written at the end (needs matplotlib).
    ``out`` never overlaps an input (``model``, ``calib`` and the extra ``inputs``, e.g. the recipe file);
    ``overwrite`` replaces only an earlier export unless ``force`` (see :mod:`minillm.output_guard`).
    ``trust_remote_code`` allows running model code shipped in the model folder.
    """
    import time

    from minillm.recipe import Recipe

    if isinstance(calib, str):
        overrides["calib"] = calib
    settings = (recipe or Recipe()).merged(overrides, source="prune()")
    run = settings.model_dump(exclude=set(_NOT_RUN_SETTINGS))
    ratio, criterion, streaming, dry_run = run["ratio"], run["criterion"], run["streaming"], run["dry_run"]
    device_map, max_memory, dtype = run["device_map"], run["max_memory"], run["dtype"]
    calibration_source: str | CalibrationSet = calib if isinstance(calib, CalibrationSet) else run["calib"]
    start = time.perf_counter()
    timeline = Timeline(progress)
    progress = timeline.progress
    check_ratio(ratio)
    CRITERIA.get(criterion)  # unknown names fail before any loading, with a did-you-mean
    from minillm.option_checks import check_criterion_options, check_loading

    check_loading(device_map, max_memory, run["seed"], run["max_shard_size"])
    check_criterion_options(criterion, run["criterion_options"])
    names = parse_structures(run["structures"])
    check_axes_options(names, run["allocation"], run["round_to"])
    check_compensation_target(run["compensation_target"], run["compensation"], names, run["search"],
                              run["architecture"])
    check_search_options(run["search"], run["architecture"], criterion, run["allocation"], streaming,
                         run["search_data"], run["search_data_samples"])
    inputs = (model, calibration_source, run["search_data"], *inputs)
    if out is not None and not dry_run:
        check_output_dir(out, overwrite, force, inputs)
    if offload_dir is not None:
        from minillm.output_guard import check_no_overlap

        check_no_overlap(offload_dir, inputs, "--offload-dir")
    if report is not None:
        from minillm.report import require_matplotlib

        require_matplotlib()  # fail before the work, not after it
    source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "in-memory model")
    if isinstance(model, str):
        from minillm.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code)
        if streaming:  # --max-memory becomes the process budget: reserve one block + activations first
            from minillm.streaming import prepare_streaming_load

            load_memory, load_offload, precision = prepare_streaming_load(
                criterion, model, max_memory, offload_dir, dtype, run["batch_size"], run["seq_len"],
                run["calib_samples"], gram=run["compensation"] == "refit" or criterion == "obs",
                precision=run["compensation_precision"],
                target=run["compensation_target"])
            if precision == "float32" and run["compensation_precision"] == "auto":
                logging.getLogger("minillm").warning(
                    "compensation moments in float32: float64 would leave under half of --max-memory "
                    "for the weights (--compensation-precision float64 to insist)")
            run["compensation_precision"] = precision
        else:
            load_memory, load_offload = max_memory, offload_dir
        model = load_model(model, device_map=device_map, max_memory=load_memory, dtype=dtype,
                           offload_dir=load_offload, trust_remote_code=trust_remote_code,
                           seq_len=None if isinstance(calibration_source, CalibrationSet) else run["seq_len"])
    if run["compensation_precision"] == "auto":  # in memory: float64 (streaming resolved it above)
        run["compensation_precision"] = "float64"
    settings = settings.merged({"compensation_precision": run["compensation_precision"]})  # recorded
    adapter = adapter_for(model.config)
    if "hidden" in names and (blocker := adapter.hidden_pruning_blocker(model.config)):
        raise UsageError(blocker)
    offloaded = is_offloaded(model)  # decides only how the cut model is written, never how it is scored
    check_search_options(run["search"], run["architecture"], criterion, run["allocation"], offloaded,
                         run["search_data"], run["search_data_samples"])
    if offloaded:
        from minillm.memory import return_large_frees_to_the_os

        return_large_frees_to_the_os()  # block-sized tensors come and go: keep them off the heap
    timeline.mark("loaded", count_parameters(model))
    layers = prunable_layers(len(adapter.decoder_layers(model)), run["skip_first"], run["skip_last"])
    if not (run["search"] or run["architecture"]):  # (those plans check their own bounds)
        check_plan_from_shapes(model, layers, ratio, run["allocation"], run["head_mode"], run["structures"])
    if isinstance(calibration_source, CalibrationSet):
        calibration = calibration_source
    else:
        if tokenizer is None:
            raise UsageError(
                "a tokenizer is needed to read calibration text; pass tokenizer=… or a CalibrationSet"
            )
        calibration = calibration_set(tokenizer, calibration_source, run["calib_samples"], run["seq_len"],
                                      run["seed"], run["batch_size"])
    held_out = held_out_set(tokenizer, run, calibration,  # --search-data: the text that ranks the search
                            None if isinstance(calibration_source, CalibrationSet) else calibration_source)
    if offloaded:
        from minillm.memory import release_free_heap

        release_free_heap()  # what tokenising left in the heap would sit beside every block
    spsa = SpsaConfig(steps=run["spsa_steps"], eps=run["spsa_eps"], seed=run["seed"])
    with measure() as scoring:
        if names & {"attn", "mlp"}:
            score = score_model(model, criterion, calibration, layers, run["seed"], spsa,
                                run["criterion_options"], progress)
        else:  # hidden/layers only: the width criterion has nothing to score
            score = ScoreResult(scores={}, notes={"width_criterion": "not run (no attn/mlp structures)"})
        hidden_scores, layer_scores = score_axes(model, adapter, calibration, names, layers,
                                                 run["layer_score"], progress)
    timeline.mark("scored", count_parameters(model))
    plan = plan_for(model, score, settings, hidden_scores, layer_scores, calibration, progress, held_out)
    from minillm.runtime_widths import kernel_width_note

    for note in (plan.extra.get("uniform_note"), kernel_width_note(plan, model, adapter)):
        if note:
            logging.getLogger("minillm").warning(note)
    options = {  # the run's settings as they were used (an in-memory calibration set shows its shape)
        **{k: v for k, v in run.items() if k not in ("device_map", "max_memory", "dtype", "dry_run",
                                                   "max_shard_size", "streaming")},
        "calib": run["calib"] if not isinstance(calibration_source, CalibrationSet) else "in-memory",
        "calib_samples": calibration.input_ids.shape[0], "seq_len": calibration.input_ids.shape[1],
        "batch_size": calibration.batch_size, "structures": structures_label(names),
    }
    if "search" in plan.extra:  # the export replays the chosen architecture, not the search
        options.update(search=False, architecture=plan.extra["architecture"])
    result = PruneResult(
        plan=plan, model=model, score=score, scoring=scoring, total_seconds=0.0, timeline=timeline
    )
    if run["compensation"] == "bias":  # count the biases bias folding will add, as the export will have
        from minillm.cut import apply_cut, meta_skeleton  # them: a plan they keep from shrinking is refused

        skeleton = meta_skeleton(model)  # before compensation edits the caller's model
        apply_cut(skeleton, adapter, plan, _bias_markers(model, adapter, plan))
        _count_export(plan, count_parameters(skeleton))
    check_shrinks(plan)  # before compensation or surgery changes the caller's model
    if dry_run:
        result.total_seconds = time.perf_counter() - start
        _write_report(result, report)
        return result
    done = cut_as(settings, model, adapter, plan, calibration, progress,  # offloaded: a meta skeleton
                  compensated=lambda: timeline.mark("compensated", count_parameters(model)),
                  spill_dir=offload_dir)
    plan = result.plan = done.plan
    if done.compensation is not None:
        result.compensation = done.compensation
        score.notes["compensation_forward_passes"] = done.forward_passes
    _count_export(plan, count_parameters(done.model))
    check_shrinks(plan)
    timeline.mark("pruned", plan.params_after)
    result.total_seconds = time.perf_counter() - start
    result.metadata = _metadata(source, plan, options, score, scoring, result.total_seconds, command)
    if result.compensation is not None:
        chooser = selection(criterion, run["compensation"], run["reselect"])
        result.metadata["compensation"] = {**result.compensation.as_dict(), "mode": run["compensation"],
                                           "damping": run["damping"], "target": run["compensation_target"],
                                           "select": chooser,
                                           "forward_passes": score.notes["compensation_forward_passes"]}
    result.metadata["recipe"] = settings.merged(  # the Recipe as it ran: replaying it never clobbers a folder
        {"model": source, "out": None if out is None else str(out), "overwrite": False, "force": False,
         "trust_remote_code": False, "dry_run": False, "report": None if report is None else str(report),
         "offload_dir": offload_dir,
         **{k: options[k] for k in ("calib", "calib_samples", "seq_len", "batch_size", "structures")},
         # the export replays the chosen architecture, not the search
         **({"search": False, "architecture": plan.extra["architecture"]} if "search" in plan.extra else {})},
        source="resolved recipe").to_dict()
    folder = out
    if done.offloaded:  # cut while written: the Python API without --out writes to a temporary folder
        from minillm.streaming import default_offload_dir

        folder = out if out is not None else default_offload_dir()
    if folder is not None:
        try:
            written = export(model, done, tokenizer, adapter, folder, result.metadata,
                             render_card(result.metadata), overwrite=overwrite or out is None,
                             max_shard_size=run["max_shard_size"], force=force, inputs=inputs)
        finally:
            done.release()  # offloaded: the compensated closings waited on disk for the export
        result.out = written if out is not None else None
        timeline.mark("exported", plan.params_after)
    if done.offloaded:
        from minillm.loading import load_model

        # the pruned model, offloaded like the dense one was (its weights are read from the export)
        result.model = load_model(str(written), device_map=device_map, max_memory=max_memory, dtype=dtype,
                                  offload_dir=default_offload_dir(),
                                  # the file minillm has just written itself, not one found in a folder
                                  trust_remote_code=needs_remote_code(done.model, adapter))
    _write_report(result, report)
    return result


def plan_for(model: nn.Module, score: ScoreResult, recipe: Recipe, hidden_scores: Any = None,
             layer_scores: dict[int, float] | None = None, calibration: CalibrationSet | None = None,
             progress: Progress | None = None, held_out: CalibrationSet | None = None) -> PrunePlan:
    """The plan ``recipe`` asks for (ratio, allocation, head mode, structures, rounding) from ``score``:
    what ``prune`` cuts, and what every ``compare`` cell cuts (``allocation="error"`` walks
    ``calibration`` for its refit-error curves; ``--search`` ranks on ``held_out``, the ``--search-data``
    windows, when the recipe names that text)."""
    names = parse_structures(recipe.structures)
    if recipe.search or recipe.architecture:  # a chosen uniform architecture (minillm.search)
        from minillm.search import plan_from_run

        adapter = adapter_for(model.config)
        plan = plan_from_run(model, adapter, layer_shapes(model, adapter), score.scores, hidden_scores,
                             layer_scores, count_parameters(model), calibration, recipe.model_dump(), names,
                             progress, held_out)
    else:
        plan = plan_from_scores(model, score, recipe.ratio, recipe.allocation, recipe.head_mode,
                                recipe.structures, recipe.round_to, hidden_scores, layer_scores,
                                calibration=calibration, damping=recipe.damping, progress=progress)
    count = len(adapter_for(model.config).decoder_layers(model))
    plan.extra = {"criterion": recipe.criterion,
                  "layers_scored": prunable_layers(count, recipe.skip_first, recipe.skip_last),
                  "structures": structures_label(names), **plan.extra}
    if layer_scores is not None:
        plan.extra["layer_scores"] = {str(i): v for i, v in layer_scores.items()}
        plan.extra["layer_score"] = recipe.layer_score
    return plan


def cut_as(recipe: Recipe, model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
           calibration: CalibrationSet | None, progress: Progress | None = None,
           compensated: Callable[[], None] | None = None, spill_dir: str | None = None) -> CutResult:
    """The cut stage with ``recipe``'s compensation (``obs`` re-chooses its groups on the pruned prefix);
    offloaded, the compensated closings wait on disk under ``spill_dir`` until the export reads them."""
    return cut(model, adapter, plan, calibration, recipe.compensation, recipe.damping,
               select=selection(recipe.criterion, recipe.compensation, recipe.reselect), progress=progress,
               compensated=compensated, spill_dir=spill_dir, precision=recipe.compensation_precision,
               target=recipe.compensation_target)


def check_plan_from_shapes(model: nn.Module, layers: list[int], ratio: float, allocation: Allocation,
                           head_mode: HeadMode, structures: Structures) -> None:
    """Plan once with equal scores, before calibration and scoring: uniform and log widths depend only on
    the shapes, so a ratio that would empty a layer is refused in a second instead of after scoring.
    Plans that cut hidden size or layers need their own scores; their planner checks its bounds itself."""
    if allocation not in ("uniform", "log") or parse_structures(structures) & {"hidden", "layers"}:
        return
    import torch

    from minillm.plan import LayerScores

    adapter = adapter_for(model.config)
    flat = {i: LayerScores(torch.zeros(s.num_heads), torch.zeros(s.num_kv_heads), torch.zeros(s.intermediate))
            for i, s in layer_shapes(model, adapter).items() if i in layers}
    plan_from_scores(model, ScoreResult(scores=flat), ratio, allocation, head_mode, structures)


def _bias_markers(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> dict[int, dict[str, Any]]:
    """Stand-ins for the closings ``--compensation bias`` will produce: the closing projection of every
    family that loses groups gets a bias; on the meta skeleton only the bias's existence matters."""
    from minillm.compensation.layer import ClosingUpdate

    marker = ClosingUpdate(weight=torch.empty(0), bias=torch.empty(0))
    markers: dict[int, dict[str, Any]] = {}
    for layer in plan.layers:
        shape = adapter.layer_shape(model, layer.index)
        families = {"attn": len(layer.heads) < shape.num_heads,
                    "mlp": len(layer.channels) < shape.intermediate}
        markers[layer.index] = {name: marker for name, cut in families.items() if cut}
    return markers


def _count_export(plan: PrunePlan, exported: int) -> None:
    """``params_after`` becomes the export's count; what compensation added is recorded in ``extra``."""
    if exported != plan.params_after:
        plan.extra["compensation_params"] = exported - plan.params_after
    plan.params_after = exported


def check_shrinks(plan: PrunePlan) -> None:
    """Refuse a plan that removes nothing, or whose export would not be smaller than the model."""
    if plan.params_after >= plan.params_before:
        raise UsageError(
            f"--ratio {plan.target_ratio:g} does not shrink the model ({plan.params_before:,} → "
            f"{plan.params_after:,} parameters); raise --ratio (see `minillm inspect` for the group costs)"
        )


def _write_report(result: PruneResult, report: str | Path | None) -> None:
    if report is not None:
        from minillm.report import write_prune_report

        write_prune_report(result, report)


def _metadata(source: str, plan: PrunePlan, options: dict[str, Any], score: ScoreResult, scoring: Measurement,
              seconds: float, command: str | None) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "minillm_version": minillm.__version__,
        "base_model": source,
        "criterion": options["criterion"],
        "options": options,
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "achieved_ratio": plan.achieved_ratio,
        "layer_widths": pruned_widths(plan),
        "plan": plan.to_dict(),
        "scoring": {**scoring.as_dict(), "forward_passes": score.forward_passes,
                    "backward_passes": score.backward_passes, **score.notes},
        "total_seconds": round(seconds, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "command": command or "",
    }
