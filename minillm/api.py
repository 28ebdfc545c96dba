"""The Python API: ``prune`` does what ``minillm prune`` does, and the CLI only calls it.

A run reads top to bottom: load → adapter → layer shapes and costs → calibration set → scores
(criterion) → plan → surgery → export.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

import minillm
from minillm.arch import adapter_for
from minillm.arch.base import ArchAdapter, LayerShape
from minillm.calibration.blocks import is_offloaded
from minillm.calibration.data import CalibrationSet, calibration_set
from minillm.calibration.spsa import SpsaConfig
from minillm.card import render_card
from minillm.errors import UsageError
from minillm.export import check_output_dir, needs_remote_code, save_pruned
from minillm.groups import layer_costs, prunable_layers
from minillm.memory import Measurement, measure
from minillm.plan import Allocation, HeadMode, PrunePlan, Structures, build_plan, check_ratio
from minillm.recipe import export_recipe
from minillm.report.timeline import Timeline
from minillm.scoring import CRITERIA, ScoreResult, ScoringContext
from minillm.surgery import apply_plan, pruned_widths

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


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once, also after accelerate's offload hooks have
    replaced one side of the tie by a copy during a forward pass)."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and outputs is not None and inputs is not None \
            and outputs.weight is not inputs.weight and outputs.weight.shape == inputs.weight.shape:
        total -= outputs.weight.numel()
    return total


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
                     head_mode: HeadMode = "kv", structures: Structures = "both") -> PrunePlan:
    adapter = adapter_for(model.config)
    shapes = layer_shapes(model, adapter)
    layers = adapter.decoder_layers(model)
    costs = {i: layer_costs(adapter, layers[i], shapes[i]) for i in shapes}
    return build_plan(shapes, costs, result.scores, count_parameters(model), ratio, allocation, head_mode,
                      structures)


#: Recipe fields that are not settings of the pruning itself (where the result goes, replay text): they
#: are keyword arguments of :func:`prune` (command-line flags), never read from a recipe by the run.
_NOT_RUN_SETTINGS = ("description", "model", "out", "overwrite", "report", "offload_dir")


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
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` (hub id, folder, ``.gguf`` file, or a loaded model) as ``recipe`` says.

    Every setting of the run is a field of :class:`~minillm.recipe.Recipe` (with its help text and
    validation): pass a recipe, or its fields as keyword ``overrides`` (``prune(m, ratio=0.3)``), or
    both (overrides win). ``calib`` may also be a ready :class:`CalibrationSet`. With ``out`` the pruned
    model is exported there atomically; with ``dry_run`` only the plan is made; with ``report`` an HTML
    report (and PNGs beside it) is written at the end (needs matplotlib).
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
    if out is not None and not dry_run:
        check_output_dir(out, overwrite)
    if report is not None:
        from minillm.report import require_matplotlib

        require_matplotlib()  # fail before the work, not after it
    source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "in-memory model")
    if isinstance(model, str):
        from minillm.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model)
        if streaming:  # --max-memory becomes the process budget: reserve one block + activations first
            from minillm.streaming import prepare_streaming_load

            load_memory, load_offload = prepare_streaming_load(
                criterion, model, max_memory, offload_dir, dtype, run["batch_size"], run["seq_len"],
                run["calib_samples"])
        else:
            load_memory, load_offload = max_memory, offload_dir
        model = load_model(model, device_map=device_map, max_memory=load_memory, dtype=dtype,
                           offload_dir=load_offload)
    adapter = adapter_for(model.config)
    offloaded = is_offloaded(model)  # decides only how the cut model is written, never how it is scored
    if offloaded:
        from minillm.memory import return_large_frees_to_the_os

        return_large_frees_to_the_os()  # block-sized tensors come and go: keep them off the heap
    timeline.mark("loaded", count_parameters(model))
    layers = prunable_layers(len(adapter.decoder_layers(model)), run["skip_first"], run["skip_last"])
    if isinstance(calibration_source, CalibrationSet):
        calibration = calibration_source
    else:
        if tokenizer is None:
            raise UsageError(
                "a tokenizer is needed to read calibration text; pass tokenizer=… or a CalibrationSet"
            )
        calibration = calibration_set(tokenizer, calibration_source, run["calib_samples"], run["seq_len"],
                                      run["seed"], run["batch_size"])
    spsa = SpsaConfig(steps=run["spsa_steps"], eps=run["spsa_eps"], seed=run["seed"])
    with measure() as scoring:
        score = score_model(model, criterion, calibration, layers, run["seed"], spsa,
                            run["criterion_options"], progress)
    timeline.mark("scored", count_parameters(model))
    plan = plan_from_scores(model, score, ratio, run["allocation"], run["head_mode"], run["structures"])
    plan.extra = {"criterion": criterion, "layers_scored": layers}
    options = {  # the run's settings as they were used (an in-memory calibration set shows its shape)
        **{k: v for k, v in run.items() if k not in ("device_map", "max_memory", "dtype", "dry_run",
                                                   "max_shard_size", "streaming")},
        "calib": run["calib"] if not isinstance(calibration_source, CalibrationSet) else "in-memory",
        "calib_samples": calibration.input_ids.shape[0], "seq_len": calibration.input_ids.shape[1],
        "batch_size": calibration.batch_size,
    }
    result = PruneResult(
        plan=plan, model=model, score=score, scoring=scoring, total_seconds=0.0, timeline=timeline
    )
    if dry_run:
        result.total_seconds = time.perf_counter() - start
        _write_report(result, report)
        return result
    if offloaded:  # the cut (and any compensation) happens block by block in the shard writer
        from minillm.streaming_export import pruned_skeleton

        pruned = pruned_skeleton(model, adapter, plan, score.compensation)
    else:
        if score.compensation:  # e.g. FLAP: fold removed groups' mean output into biases before slicing
            from minillm.scoring.compensation import compensate

            compensate(model, adapter, plan, score.compensation)
        apply_plan(model, adapter, plan)
        pruned = model
    plan.params_after = count_parameters(pruned)
    timeline.mark("pruned", plan.params_after)
    result.total_seconds = time.perf_counter() - start
    result.metadata = _metadata(source, plan, options, score, scoring, result.total_seconds, command)
    result.metadata["recipe"] = export_recipe(source, out, options, device_map=device_map,
                                              max_memory=max_memory, dtype=dtype,
                                              max_shard_size=run["max_shard_size"], report=report,
                                              streaming=streaming, offload_dir=offload_dir)
    if offloaded:
        from minillm.loading import load_model
        from minillm.streaming import default_offload_dir
        from minillm.streaming_export import save_pruned_streaming

        folder = out if out is not None else default_offload_dir()  # the Python API without --out
        written = save_pruned_streaming(model, tokenizer, adapter, plan, folder, result.metadata,
                                        render_card(result.metadata), overwrite=overwrite or out is None,
                                        max_shard_size=run["max_shard_size"], skeleton=pruned,
                                        compensation=score.compensation)
        result.out = written if out is not None else None
        timeline.mark("exported", plan.params_after)
        # the pruned model, offloaded like the dense one was (its weights are read from the export)
        result.model = load_model(str(written), device_map=device_map, max_memory=max_memory, dtype=dtype,
                                  offload_dir=default_offload_dir(),
                                  trust_remote_code=needs_remote_code(pruned, adapter))  # our own file
    elif out is not None:
        result.out = save_pruned(model, tokenizer, adapter, out, result.metadata,
                                 render_card(result.metadata), overwrite=overwrite,
                                 max_shard_size=run["max_shard_size"])
        timeline.mark("exported", plan.params_after)
    _write_report(result, report)
    return result


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
