"""The Python API: ``prune`` does what ``minillm prune`` does, and the CLI only calls it.

A run reads top to bottom: load → adapter → layer shapes and costs → calibration set → scores
(criterion) → plan → surgery → export.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import minillm
from minillm.arch import adapter_for
from minillm.arch.base import ArchAdapter, LayerShape
from minillm.calibration.data import CalibrationSet, calibration_set
from minillm.calibration.spsa import SpsaConfig
from minillm.card import render_card
from minillm.defaults import DEFAULT_CRITERION
from minillm.errors import UsageError
from minillm.export import check_output_dir, save_pruned
from minillm.groups import layer_costs, prunable_layers
from minillm.memory import Measurement, measure
from minillm.plan import Allocation, HeadMode, PrunePlan, Structures, build_plan, check_ratio
from minillm.recipe import export_recipe
from minillm.report.timeline import Timeline
from minillm.scoring import CRITERIA, ScoreResult, ScoringContext
from minillm.surgery import apply_plan, pruned_widths

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
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


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
    return score_fn(ctx)


def plan_from_scores(model: nn.Module, result: ScoreResult, ratio: float, allocation: Allocation = "uniform",
                     head_mode: HeadMode = "kv", structures: Structures = "both") -> PrunePlan:
    adapter = adapter_for(model.config)
    shapes = layer_shapes(model, adapter)
    layers = adapter.decoder_layers(model)
    costs = {i: layer_costs(adapter, layers[i], shapes[i]) for i in shapes}
    return build_plan(shapes, costs, result.scores, count_parameters(model), ratio, allocation, head_mode,
                      structures)


def prune(
    model: str | nn.Module,
    *,
    ratio: float = 0.2,
    out: str | Path | None = None,
    criterion: str = DEFAULT_CRITERION,
    allocation: Allocation = "uniform",
    head_mode: HeadMode = "kv",
    structures: Structures = "both",
    skip_first: int = 0,
    skip_last: int = 0,
    calib: str | CalibrationSet = "wikitext2",
    calib_samples: int = 32,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    spsa_steps: int = 16,
    spsa_eps: float = 1e-3,
    criterion_options: dict[str, Any] | None = None,
    tokenizer: Any = None,
    device_map: str | dict | None = "auto",
    max_memory: str | dict | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    dry_run: bool = False,
    max_shard_size: str | int = "5GB",
    streaming: bool = False,
    offload_dir: str | None = None,
    report: str | Path | None = None,
    progress: Progress | None = None,
    command: str | None = None,
) -> PruneResult:
    """Prune ``model`` (hub id, folder, ``.gguf`` file, or a loaded model) by ``ratio`` of its parameters.

    With ``out`` the pruned model is exported there atomically; with ``dry_run`` only the plan is made.
    With ``report`` an HTML report (and PNGs beside it) is written at the end (needs matplotlib).
    """
    import time

    start = time.perf_counter()
    timeline = Timeline(progress)
    progress = timeline.progress
    check_ratio(ratio)
    if streaming:
        from minillm.memory import return_large_frees_to_the_os
        from minillm.streaming import streaming_criterion

        streaming_criterion(criterion)  # block-by-block needs a criterion that has that mode
        return_large_frees_to_the_os()  # block-sized tensors come and go: keep them off the heap
    elif criterion not in CRITERIA:
        from minillm.streaming import STREAMING

        if criterion in STREAMING:
            raise UsageError(f"criterion {criterion!r} exists only block by block: add --streaming")
        CRITERIA.get(criterion)  # raises the did-you-mean error
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
                criterion, model, max_memory, offload_dir, dtype, batch_size, seq_len, calib_samples)
        else:
            load_memory, load_offload = max_memory, offload_dir
        model = load_model(model, device_map=device_map, max_memory=load_memory, dtype=dtype,
                           offload_dir=load_offload)
    adapter = adapter_for(model.config)
    if not streaming:
        from minillm.calibration.blocks import is_offloaded

        if is_offloaded(model):  # offloaded weights sit on `meta`: only the block-by-block path can read them
            from minillm.memory import return_large_frees_to_the_os
            from minillm.streaming import streaming_criterion

            streaming_criterion(criterion)
            streaming = True
            return_large_frees_to_the_os()
    timeline.mark("loaded", model)
    layers = prunable_layers(len(adapter.decoder_layers(model)), skip_first, skip_last)
    if isinstance(calib, CalibrationSet):
        calibration = calib
    else:
        if tokenizer is None:
            raise UsageError(
                "a tokenizer is needed to read calibration text; pass tokenizer=… or a CalibrationSet"
            )
        calibration = calibration_set(tokenizer, calib, calib_samples, seq_len, seed, batch_size)
    spsa = SpsaConfig(steps=spsa_steps, eps=spsa_eps, seed=seed)
    with measure() as scoring:
        from minillm.streaming import score_streaming  # same signature as score_model, block by block

        score_fn = score_streaming if streaming else score_model
        score = score_fn(model, criterion, calibration, layers, seed, spsa, criterion_options, progress)
    timeline.mark("scored", model)
    plan = plan_from_scores(model, score, ratio, allocation, head_mode, structures)
    plan.extra = {"criterion": criterion, "layers_scored": layers}
    options = {
        "ratio": ratio, "criterion": criterion, "allocation": allocation, "head_mode": head_mode,
        "structures": structures, "skip_first": skip_first, "skip_last": skip_last,
        "calib": calib if isinstance(calib, str) else "in-memory",
        "calib_samples": calibration.input_ids.shape[0],
        "seq_len": calibration.input_ids.shape[1], "batch_size": calibration.batch_size, "seed": seed,
        "spsa_steps": spsa_steps, "spsa_eps": spsa_eps, "criterion_options": criterion_options or {},
    }
    result = PruneResult(
        plan=plan, model=model, score=score, scoring=scoring, total_seconds=0.0, timeline=timeline
    )
    if dry_run:
        result.total_seconds = time.perf_counter() - start
        _write_report(result, report)
        return result
    if streaming:  # surgery (and any compensation) happens block by block in the export
        from minillm.streaming_export import pruned_skeleton

        pruned = pruned_skeleton(model, adapter, plan, score.compensation)
    else:
        if score.compensation:  # e.g. FLAP: fold removed groups' mean output into biases before slicing
            from minillm.scoring.compensation import compensate

            compensate(model, adapter, plan, score.compensation)
        apply_plan(model, adapter, plan)
        pruned = model
    plan.params_after = count_parameters(pruned)
    timeline.mark("pruned", model)
    result.total_seconds = time.perf_counter() - start
    result.metadata = _metadata(source, plan, options, score, scoring, result.total_seconds, command)
    result.metadata["recipe"] = export_recipe(source, out, options, device_map=device_map,
                                              max_memory=max_memory, dtype=dtype,
                                              max_shard_size=max_shard_size, report=report,
                                              streaming=streaming, offload_dir=offload_dir)
    if out is not None:
        if streaming:
            from minillm.streaming_export import save_pruned_streaming

            result.out = save_pruned_streaming(model, tokenizer, adapter, plan, out, result.metadata,
                                               render_card(result.metadata), overwrite=overwrite,
                                               max_shard_size=max_shard_size, skeleton=pruned,
                                               compensation=score.compensation)
        else:
            result.out = save_pruned(model, tokenizer, adapter, out, result.metadata,
                                     render_card(result.metadata), overwrite=overwrite,
                                     max_shard_size=max_shard_size)
        timeline.mark("exported", model)
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
