"""The cut stage: compensate, then slice — one step, for a resident model and for an offloaded one.

Why one function: ``prune``, ``compare`` and the block-by-block shard writer all cut the same way, and
a second copy of "compensate, give the closings their biases, slice" would drift from the first (the
mask ≡ surgery invariant is only as good as the single path it checks). The pieces:

1. the sequential compensation pass (:func:`~minillm.compensation.sequential.compensate_sequential`,
   ``--compensation`` and the ``obs`` criterion's re-selection) on the pruned prefix;
2. :func:`apply_cut`: compensated closings in, biases the compensation added made loadable
   (:mod:`minillm.compensation.bias`), the plan sliced (:func:`~minillm.surgery.apply_plan`).

A resident model is compensated in place and cut in place. The weights of an offloaded model are not
all in memory: the compensated closings are kept aside, the cut is made on a meta skeleton (final
shapes and config, no weights) and :func:`apply_cut` runs again on each block as the shard writer
(:mod:`minillm.streaming_export`) loads it — the same code, one block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.blocks import is_offloaded
from minillm.calibration.data import CalibrationSet
from minillm.compensation.bias import express_biases, expressible_biases, set_closings
from minillm.memory import Measurement, measure
from minillm.plan import PrunePlan
from minillm.surgery import apply_plan

Progress = Callable[[str, int, int], None]


@dataclass
class CutResult:
    """What the cut produced.

    ``model``: the pruned model (resident) or the pruned meta skeleton whose weights the shard writer
    cuts block by block (offloaded); ``updates``: the compensated closing projections it then needs.
    """

    plan: PrunePlan
    model: nn.Module
    offloaded: bool
    updates: dict[int, dict[str, Any]] = field(default_factory=dict)
    compensation: Measurement | None = None  # the sequential compensation pass (None: not run)
    forward_passes: int = 0
    #: offloaded: the folder the compensated closings wait in until the shard writer reads them
    spill: Path | None = None

    def release(self) -> None:
        """Remove the spilled closings (after the export has read them)."""
        if self.spill is not None:
            import shutil

            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model``'s architecture (same class, config copy and dtype, same ties)."""
    import copy

    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = type(model)._from_config(copy.deepcopy(model.config), dtype=model.dtype)
    skeleton.tie_weights()  # not done by _from_config: without it tied heads are counted and saved twice
    return skeleton.eval()


def apply_cut(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
              updates: dict[int, dict[str, Any]] | None = None, families: dict[str, str] | None = None,
              layers: list[int] | None = None) -> None:
    """Compensated closings ``updates`` in, their biases made expressible (``families``: default, those
    the model now needs), then ``plan`` sliced — on the whole model, or on the blocks ``layers``."""
    if updates:
        set_closings(model, adapter, updates, layers=layers)
    families = expressible_biases(model, adapter) if families is None else families
    blocks = adapter.decoder_layers(model)
    express_biases(model, adapter, families, layers=None if layers is None else [blocks[i] for i in layers])
    apply_plan(model, adapter, plan)


def selection(criterion: str, compensation: str, reselect: bool) -> str:
    """Who chooses the groups during the compensation pass: ``obs`` always re-chooses with OBS; ``flap``
    with the refit (and ``reselect``) re-chooses by its fluctuation metric on the pruned prefix
    (:mod:`minillm.compensation.fluctuation`); otherwise the plan as scored. Not under ``bias``: there the
    re-chosen groups measured worse on wiki.valid (96.2 vs 89.5 on all windows at 0.2, where the refit
    gains: 45.22 vs 45.37; docs/benchmarks.md, "The matrix completed")."""
    if criterion == "obs":
        return "obs"
    if criterion == "flap" and compensation == "refit" and reselect:
        return "fluctuation"
    return "plan"


def cut(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan, calibration: CalibrationSet | None = None,
        compensation: str = "none", damping: float | None = None, select: str = "plan",
        progress: Progress | None = None, compensated: Callable[[], None] | None = None,
        spill_dir: str | Path | None = None, precision: str = "float64", target: str = "pruned"
        ) -> CutResult:
    """Compensate (``compensation``: none, bias, refit; ``select="obs"`` re-chooses the groups on the
    pruned prefix; ``precision``: the dtype of the moments ``H``; ``target``: the refit's, pruned or
    dense) and cut ``model`` as ``plan`` says;
    where the weights live decides only whether the slicing happens now (resident) or block by block in
    the export (offloaded). ``compensated()`` is called between the two steps when a compensation pass
    ran (the report's stage marks). Offloaded, the compensated closings wait on disk in a fresh folder
    under ``spill_dir`` (the offload folder; default the system's temporary folder) until the export
    reads them: :meth:`CutResult.release` removes it."""
    offloaded = is_offloaded(model)
    result = CutResult(plan=plan, model=model, offloaded=offloaded)
    if compensation != "none" or select != "plan":
        from minillm.compensation.layer import CompensationOptions
        from minillm.compensation.sequential import compensate_sequential, spill_folder

        if calibration is None:
            raise ValueError("compensation and re-selection need the calibration set")
        extra = {} if damping is None else {"damping": damping}
        options = CompensationOptions(mode=compensation, select=select, precision=precision,  # type: ignore[arg-type]
                                      target=target, **extra)  # type: ignore[arg-type]
        result.spill = spill_folder(spill_dir) if offloaded else None
        with measure() as compensating:
            outcome = compensate_sequential(model, adapter, plan, calibration, options, progress,
                                            in_place=not offloaded, spill=result.spill)
        result.plan, result.updates = outcome.plan, outcome.updates
        result.compensation, result.forward_passes = compensating, outcome.forward_passes
        if compensated is not None:
            compensated()
    if offloaded:
        result.model = meta_skeleton(model)
    apply_cut(result.model, adapter, result.plan, result.updates)
    return result
