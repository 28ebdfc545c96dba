"""Scores of the two axes beyond heads and channels: hidden channels and whole decoder layers.

* Hidden channel (Minitron): the activation of every residual-stream norm's output, ``|x|`` averaged
  over the sequence, then the L2 norm over the batch, summed over the norms. Pure reductions
  (:func:`hidden_activation`, :class:`HiddenStats`), fed block by block by the sequential executor
  (:mod:`minillm.calibration.sequential`), so offloaded models are scored the same way.
* Layer, ``influence`` (ShortGPT's block influence): ``1 - cos(h_in, h_out)`` of the layer's input and
  output hidden states, averaged over calibration tokens. A layer that barely turns the residual stream
  is the cheapest to drop. Pure reduction: :func:`block_influence`, accumulated in :class:`LayerStats`.
* Layer, ``loss``: the calibration loss with the layer skipped minus the dense loss (the rest of the
  model run once per candidate layer from the dense prefix: about ``n_layers / 2`` forward passes).

Higher score = more important, as for every other group in minillm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError

LAYER_SCORES = ("influence", "loss")
Progress = Callable[[str, int, int], None]


def hidden_activation(norm_output: torch.Tensor) -> torch.Tensor:
    """Per sequence and channel: mean over the sequence of ``|x|`` (``[batch, seq, hidden]`` → ``[batch,
    hidden]``), in float64."""
    x = norm_output.detach()
    if x.dim() == 2:
        x = x[None]
    return x.abs().to(torch.float64).mean(dim=1)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of ``1 - cos(h_in, h_out)`` and the token count (ShortGPT)."""
    a = h_in.detach().reshape(-1, h_in.shape[-1]).to(torch.float64)
    b = h_out.detach().reshape(-1, h_out.shape[-1]).to(torch.float64)
    cos = nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return float((1.0 - cos).sum()), int(a.shape[0])


@dataclass
class HiddenStats:
    """Σ over calibration sequences of (mean_seq |x|)², per norm; the score sums their square roots."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, norm_index: int, norm_output: torch.Tensor) -> None:
        per_sequence = hidden_activation(norm_output)
        squares = (per_sequence**2).sum(0).cpu()
        self.sums[norm_index] = self.sums[norm_index] + squares if norm_index in self.sums else squares

    def scores(self) -> torch.Tensor:
        if not self.sums:
            raise UsageError("no hidden-channel statistics were collected (empty calibration set?)")
        return torch.stack([s.sqrt() for s in self.sums.values()]).sum(0).float()


@dataclass
class LayerStats:
    """Running sum of block influence per layer."""

    totals: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        total, count = block_influence(h_in, h_out)
        self.totals[layer] = self.totals.get(layer, 0.0) + total
        self.counts[layer] = self.counts.get(layer, 0) + count

    def scores(self) -> dict[int, float]:
        return {i: self.totals[i] / max(self.counts[i], 1) for i in sorted(self.totals)}


def _first_tensor(value: object) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[return-value]


def collect_axis_stats(model: nn.Module, adapter: ArchAdapter, calibration: CalibrationSet,
                       hidden: bool, layers: Sequence[int], progress: Progress | None = None
                       ) -> tuple[torch.Tensor | None, dict[int, float]]:
    """Hidden-channel scores (or None) and block influence of ``layers``, in one walk of the sequential
    executor: each block's norms are observed while it advances, the final norm on the last outputs."""
    from minillm.calibration.blocks import head_resident
    from minillm.calibration.sequential import Block, Sequential

    hidden_stats, layer_stats = HiddenStats(), LayerStats()
    decoder = adapter.decoder_layers(model)
    norms = adapter.hidden_norms(model) if hidden else []
    index_of = {id(norm): i for i, norm in enumerate(norms)}
    block_norms = {i: [n for n in layer.modules() if id(n) in index_of] for i, layer in enumerate(decoder)}
    inside = {id(n) for found in block_norms.values() for n in found}
    outer = [n for n in norms if id(n) not in inside]

    def per_block(block: Block) -> None:
        handles = [norm.register_forward_hook(
            lambda module, args, output: hidden_stats.add(index_of[id(module)], _first_tensor(output)))
            for norm in block_norms[block.index]]
        try:
            outputs = block.forward(advance=True)
        finally:
            for handle in handles:
                handle.remove()
        if block.index in chosen:
            for before, after in zip(block.inputs, outputs, strict=True):
                layer_stats.add(block.index, before.hidden, after.hidden)

    chosen = set(layers)
    walked = set(range(len(decoder))) if hidden else chosen
    executor = Sequential(model, adapter, calibration, progress=progress)
    walk = executor.run(per_block, layers=sorted(walked), to_end=bool(outer), task="hidden/layer statistics")
    if outer:
        with torch.no_grad(), head_resident(model, adapter):
            for batch in walk.outputs or []:
                for norm in outer:
                    hidden_stats.add(index_of[id(norm)], norm(batch.hidden))
    return (hidden_stats.scores() if hidden else None), layer_stats.scores()


def layer_loss_scores(model: nn.Module, adapter: ArchAdapter, calibration: CalibrationSet,
                      layers: Sequence[int], progress: Progress | None = None) -> dict[int, float]:
    """Calibration loss with each layer of ``layers`` skipped, minus the dense loss.

    One walk of the executor: at block ``i`` its inputs are the dense prefix's outputs, so the loss
    without ``i`` is those inputs run through blocks ``i+1…`` (each made resident in turn) and the head;
    then the walk advances through ``i``. Cost: ``Σ (L − 1 − i)`` block passes over the calibration set
    (about ``L/2`` forward passes of the model for ``L`` candidate layers, e.g. 15 for SmolLM2's 30)
    plus one head evaluation per layer; memory: two sets of block activations at a time.
    """
    from minillm.calibration.blocks import resident, run_block
    from minillm.calibration.sequential import Block, Sequential

    executor = Sequential(model, adapter, calibration)
    chosen = sorted(layers)
    total = len(executor.layers)

    def without(block: Block) -> float:
        hidden = block.inputs
        for j in range(block.index + 1, total):
            with resident(executor.layers[j]):
                hidden = run_block(executor.layers[j], hidden, executor.kinds[j], executor.store)
        loss = executor.loss(hidden)
        if progress is not None:
            progress("layer loss scores", chosen.index(block.index) + 1, len(chosen))
        return loss

    walk = executor.run(without, layers=chosen, to_end=True, task="layer loss scores (dense walk)")
    base = executor.loss(walk.outputs or [])
    return {index: walk.results[index] - base for index in chosen}


def score_axes(model: nn.Module, adapter: ArchAdapter, calibration: CalibrationSet,
               structures: frozenset[str], layers: Sequence[int], layer_score: str = "influence",
               progress: Progress | None = None
               ) -> tuple[torch.Tensor | None, dict[int, float] | None]:
    """Hidden-channel scores (if ``hidden`` is cut) and layer scores (if ``layers`` are cut)."""
    if layer_score not in LAYER_SCORES:
        raise UsageError(f"--layer-score must be one of {', '.join(LAYER_SCORES)} (got {layer_score!r})")
    want_hidden, want_layers = "hidden" in structures, "layers" in structures
    if not (want_hidden or want_layers):
        return None, None
    influence_layers = list(layers) if want_layers and layer_score == "influence" else []
    hidden_scores, layer_scores = None, None
    if want_hidden or influence_layers:
        hidden_scores, influence = collect_axis_stats(model, adapter, calibration, want_hidden,
                                                      influence_layers, progress)
        layer_scores = influence if influence_layers else None
    if want_layers and layer_score == "loss":
        layer_scores = layer_loss_scores(model, adapter, calibration, layers, progress)
    return hidden_scores, layer_scores
