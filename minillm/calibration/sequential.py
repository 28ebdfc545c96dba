"""THE sequential executor: every criterion (and error compensation) walks the decoder blocks through it.

Why one executor: a criterion that owns its loop over blocks and batches exists twice (in memory and
offloaded) and drifts. Here the walk is written once — llm-compressor's sequential pipeline, whose
"basic" pipeline is the same walk with the whole model as one piece:

1. capture the first block's inputs once per walk (:mod:`minillm.calibration.blocks`: the decoder
   layers are swapped for recorders, so the model's own embedding / mask / position code runs and
   every attention kind gets its own call arguments);
2. for each block in order: make it resident (a no-op when nothing is offloaded), hand a :class:`Block`
   to the caller's per-block function — which may run the block's calibration batches any number of
   times under hooks, perturb its weights, or modify / cut them in place — then run the block *as it is
   now* to make the next block's inputs (modify-then-advance: later blocks see the pruned prefix);
3. evaluate the model's own loss or its gradient on the last outputs (the head is replayed, not copied).

Besides :meth:`Sequential.run` there are the two operations that need more than one walk: SPSA with the
full-model loss (:meth:`Sequential.spsa`: two perturbed streams per step) and the block-local backward
pass (:meth:`Sequential.backward`: exact gradients at the memory of a forward pass).

This module knows nothing of criteria (it never imports :mod:`minillm.scoring`). Calibration
activations may be stored off the compute device (``activations_device``, e.g. CPU for a GPU run with
many samples); each block moves them to its own device only while it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.backprop import model_gradients
from minillm.calibration.blocks import (
    BlockBatch,
    call_block,
    capture_first_block_inputs,
    execution_device,
    head_gradients,
    head_resident,
    input_device,
    is_offloaded,
    last_hidden_state,
    layer_kinds,
    loss_from_hidden,
    resident,
    run_block,
    unloaded,
)
from minillm.calibration.data import CalibrationSet
from minillm.calibration.forward import mean_loss
from minillm.calibration.spsa import SpsaConfig, SpsaEstimate, estimate_indexed, frozen, shift_indexed
from minillm.calibration.stats import ColumnStats, collect_input_stats

T = TypeVar("T")
Progress = Callable[[str, int, int], None]
#: ``(index, tensor)`` pairs to perturb in one block: the index is the tensor's position in the whole
#: list of perturbed tensors (it seeds the tensor's SPSA direction).
IndexedTensors = Sequence[tuple[int, torch.Tensor]]


@dataclass
class Block:
    """One decoder block during a walk, resident while the per-block function runs.

    ``inputs`` are the calibration batches as this block receives them (the outputs of the blocks
    before it, as they were when they advanced). The per-block function may call :meth:`forward`
    (under any hooks it installs through context managers) as often as it likes, and modify the
    block's weights in place or cut them; the executor then runs the block as it is to feed the next
    one, unless a forward with ``advance=True`` already produced those outputs.
    """

    index: int
    layer: nn.Module
    kind: Any
    inputs: list[BlockBatch]
    store: torch.device | None = None
    advanced: list[BlockBatch] | None = field(default=None, repr=False)
    #: The offloaded submodules :func:`resident` loaded for this block (empty in memory).
    held: Sequence[nn.Module] = field(default=(), repr=False)

    @property
    def device(self) -> torch.device:
        """Where the block computes."""
        return execution_device(self.layer)

    def forward(self, *, advance: bool = False) -> list[BlockBatch]:
        """Every calibration batch through the block as it is now; ``advance=True``: the block will not
        change any more and these outputs feed the next block (saves one pass)."""
        outputs = run_block(self.layer, self.inputs, self.kind, self.store)
        self.advanced = outputs if advance else None
        return outputs

    def stats(self, linears: Sequence[nn.Linear], *, advance: bool = False) -> dict[nn.Linear, ColumnStats]:
        """One :meth:`forward` recording the input statistics of ``linears`` (mean, |x|, x² per column);
        ``advance`` as in :meth:`forward`."""
        outputs: list[BlockBatch] = []
        stats = collect_input_stats(linears, lambda: outputs.extend(self.forward(advance=advance)))
        return stats

    def spsa(
        self, indexed: IndexedTensors, config: SpsaConfig, loss: Callable[[list[BlockBatch]], float]
    ) -> SpsaEstimate:
        """SPSA on a block-local loss: ``loss(outputs)`` of the block's outputs at θ±εz of ``indexed``
        (2 block passes per step; the weights are restored after every step)."""
        return estimate_indexed(indexed, lambda: loss(self.forward()), config)

    def unloaded(self, keep: Sequence[nn.Module] = ()) -> AbstractContextManager[None]:
        """The block's loaded weights, except those of ``keep`` and its submodules, dropped for the
        duration (read again on exit): for a step that needs only those. Weights changed in place must
        be in ``keep``. A no-op in memory."""
        kept = {id(sub) for module in keep for sub in module.modules()}
        # a held module that holds a kept one too (one hook over a subtree) stays loaded as a whole
        return unloaded([sub for sub in self.held if not any(id(m) in kept for m in sub.modules())])

    def call(self, batch: BlockBatch) -> torch.Tensor:
        """One batch through the block in the caller's grad mode (for block-local losses / gradients);
        the batch is moved to the block's device first."""
        return call_block(self.layer, batch.to(self.device), self.kind)


@dataclass
class Walk(Generic[T]):
    """What :meth:`Sequential.run` returns: the per-block results, and the last block's outputs when the
    walk went to the end of the model."""

    results: dict[int, T]
    outputs: list[BlockBatch] | None = None


class BlockProbe(Protocol):
    """What a caller differentiates inside each block during :meth:`Sequential.backward`."""

    def attach(
        self, index: int, layer: nn.Module, batch: BlockBatch
    ) -> AbstractContextManager[list[torch.Tensor]]:
        """Leaf tensors to differentiate while ``layer`` recomputes ``batch`` (``[]`` for none)."""
        ...

    def receive(self, index: int, batch: BlockBatch, gradients: Sequence[torch.Tensor]) -> None:
        """∂(Σ token losses)/∂(each attached tensor) for one batch."""
        ...

    def finish(self, index: int, layer: nn.Module) -> None:
        """Every batch of block ``index`` is done; the block is still resident (weights readable)."""
        ...


class Sequential:
    """Walks ``model``'s decoder blocks one resident block at a time over a calibration set.

    ``activations_device``: where calibration activations are kept between blocks (None: where the
    model computes them). ``progress(task, done, total)`` is called once per block.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter,
        calibration: CalibrationSet,
        *,
        activations_device: torch.device | str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.model, self.adapter, self.calibration = model, adapter, calibration
        self.store = torch.device(activations_device) if activations_device is not None else None
        self.progress = progress
        self.layers = adapter.decoder_layers(model)
        self.kinds = layer_kinds(model, adapter)
        #: Some weights live in an accelerate offload: whole-model passes are impossible, every
        #: operation walks block by block. Resident models run whole-model passes where that is the
        #: same computation (the "basic" pipeline), so their numbers do not depend on this module.
        self.offloaded = is_offloaded(model)

    def report(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)

    def inputs(self) -> list[BlockBatch]:
        """The first block's inputs for every calibration batch (recaptured on each call: cheap)."""
        return capture_first_block_inputs(self.model, self.adapter, self.calibration, self.store)

    def run(
        self,
        per_block: Callable[[Block], T] | None = None,
        *,
        layers: Iterable[int] | None = None,
        to_end: bool = False,
        task: str = "blocks",
    ) -> Walk[T]:
        """Walk the blocks in order; ``per_block(block)`` for each block in ``layers`` (default: all).

        Modify-then-advance: whatever ``per_block`` did to the block's weights is in the outputs that
        feed the next block. The walk stops after the last block of ``layers`` unless ``to_end`` (then
        :attr:`Walk.outputs` holds the last block's outputs, ready for :meth:`loss`). Weights changed
        inside an offloaded block live only in its loaded copy, which is dropped when the walk leaves it.
        """
        chosen = set(range(len(self.layers)) if layers is None else layers)
        last = len(self.layers) - 1 if to_end or not chosen else max(chosen)
        hidden, results = self.inputs(), {}
        with frozen(list(self.model.parameters())):
            for i in range(last + 1):
                layer = self.layers[i]
                with resident(layer) as held:
                    if i in chosen and per_block is not None:
                        block = Block(i, layer, self.kinds[i], hidden, self.store, held=held)
                        results[i] = per_block(block)
                        hidden = block.advanced if block.advanced is not None else block.forward()
                    else:
                        hidden = run_block(layer, hidden, self.kinds[i], self.store)
                self.report(task, i + 1, last + 1)
        return Walk(results, hidden if last == len(self.layers) - 1 else None)

    def each(
        self, per_block: Callable[[Block], T], layers: Iterable[int], task: str = "blocks"
    ) -> dict[int, T]:
        """``per_block(block)`` for each block in ``layers`` with its weights resident and no data
        (weight-only criteria, scoring from statistics gathered before)."""
        chosen = sorted(layers)
        results: dict[int, T] = {}
        for done, i in enumerate(chosen):
            with resident(self.layers[i]), torch.no_grad():
                results[i] = per_block(Block(i, self.layers[i], self.kinds[i], [], self.store))
            self.report(task, done + 1, len(chosen))
        return results

    def observe(
        self,
        linears_of: Callable[[nn.Module], Sequence[nn.Linear]],
        per_block: Callable[[Block, dict[nn.Linear, ColumnStats]], T],
        layers: Iterable[int],
        task: str = "block statistics",
    ) -> dict[int, T]:
        """One calibration pass: ``per_block(block, stats)`` with the input statistics of
        ``linears_of(layer)`` for each block in ``layers``; the result of each should be small."""

        def observe_block(block: Block) -> T:
            return per_block(block, block.stats(linears_of(block.layer), advance=True))

        return self.run(observe_block, layers=layers, task=task).results

    def loss(self, outputs: Sequence[BlockBatch]) -> float:
        """Token-weighted mean next-token loss of the last block's outputs, by the model's own head."""
        with head_resident(self.model, self.adapter):
            return loss_from_hidden(self.model, self.adapter, outputs)

    def mean_loss(self) -> float:
        """The calibration loss of the model as it is now (hooks included): one full forward pass of a
        resident model, one walk through the blocks of an offloaded one."""
        if not self.offloaded:
            return mean_loss(self.model, self.calibration)
        walk = self.run(to_end=True, task="loss")
        assert walk.outputs is not None
        return self.loss(walk.outputs)

    def head_gradients(self, outputs: Sequence[BlockBatch], sequences: int = 1) -> list[torch.Tensor]:
        """∂(Σ token losses)/∂(last block's outputs) per batch, ``sequences`` rows at a time."""
        return head_gradients(self.model, self.adapter, outputs, sequences)

    def spsa(
        self, params_of: Callable[[int, nn.Module], IndexedTensors], config: SpsaConfig,
        task: str = "SPSA perturbations",
    ) -> SpsaEstimate:
        """SPSA on the full-model loss: per step, the batches flow through every block twice (θ+εz,
        θ−εz), each block perturbed in place while resident; z is regenerated from (seed, step, index),
        so the estimate equals a whole-model one with the same tensor order.

        ``params_of(index, layer)`` names the tensors of block ``index`` to perturb (resident copies).
        """
        if not self.offloaded:  # the whole model as one piece: full forward passes, same directions
            indexed = [pair for i, layer in enumerate(self.layers) for pair in params_of(i, layer)]
            return estimate_indexed(indexed, lambda: mean_loss(self.model, self.calibration), config,
                                    on_step=lambda step: self.report(task, step + 1, config.steps))
        estimate = SpsaEstimate(config=config)
        first = self.inputs()
        with frozen(list(self.model.parameters())):
            for step in range(config.steps):
                plus, minus = first, first
                for i, layer in enumerate(self.layers):
                    with resident(layer):
                        mine = params_of(i, layer)
                        shift_indexed(mine, config.eps, config.seed, step)
                        plus = run_block(layer, plus, self.kinds[i], self.store)
                        shift_indexed(mine, -2.0 * config.eps, config.seed, step)
                        minus = run_block(layer, minus, self.kinds[i], self.store)
                        shift_indexed(mine, config.eps, config.seed, step)
                loss_plus, loss_minus = self.loss(plus), self.loss(minus)
                estimate.coefficients.append((loss_plus - loss_minus) / (2.0 * config.eps))
                estimate.forward_passes += 2
                self.report(task, step + 1, config.steps)
        return estimate

    def backward(self, probe: BlockProbe, first: int = 0, task: str = "block-wise") -> None:
        """Exact gradients block by block, down to block ``first``.

        Forward: the batches go through every block without a graph, keeping the inputs of blocks
        ``first…``; head: ∂loss/∂(last outputs) through the model's own head; backward, last block first:
        recompute the block from its stored inputs with autograd on, back-propagate to its input and to
        what ``probe`` attaches, hand the input gradient to the block below. Every weight stays frozen
        except what the probe turns on; nothing is left in any ``.grad``.
        """
        total = len(self.layers)
        with frozen(list(self.model.parameters())), torch.inference_mode(False):
            hidden = self.inputs()
            inputs: dict[int, list[BlockBatch]] = {}
            for i, layer in enumerate(self.layers):
                if i >= first:
                    inputs[i] = hidden
                with resident(layer):
                    hidden = run_block(layer, hidden, self.kinds[i], self.store)
                self.report(f"{task} forward", i + 1, total)
            with torch.enable_grad():
                upstream = self.head_gradients(hidden)
                del hidden
                for i in range(total - 1, first - 1, -1):
                    layer, below = self.layers[i], []
                    with resident(layer):
                        device = execution_device(layer)
                        for batch, grad_out in zip(inputs.pop(i), upstream, strict=True):
                            batch = batch.to(device) if self.store is not None else batch
                            x = batch.hidden.detach().requires_grad_(i > first)
                            with probe.attach(i, layer, batch) as attached:
                                targets = ([x] if x.requires_grad else []) + list(attached)
                                if not targets:
                                    continue
                                out = call_block(layer, batch.with_hidden(x), self.kinds[i])
                                grads = torch.autograd.grad(out, targets, grad_out.to(out.device))
                            if x.requires_grad:
                                below.append(grads[0] if self.store is None else grads[0].to(self.store))
                            probe.receive(i, batch, grads[1:] if x.requires_grad else grads)
                            del out, grads
                        probe.finish(i, layer)
                    upstream = below
                    self.report(f"{task} backward", total - i, total - first)

    def forward_mode(
        self,
        bind: Callable[[torch.Tensor | None], None],
        primals: Sequence[torch.Tensor],
        tangents: Sequence[torch.Tensor],
        losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        task: str = "forward-mode walk",
    ) -> list[torch.Tensor]:
        """Exact directional derivatives by forward-mode AD, one walk through the blocks.

        θ is a tensor the blocks read (e.g. gates through hooks): ``bind(θ)`` makes them read it.
        For calibration batch ``b``, θ has the value ``primals[b]`` and the direction ``tangents[b]``;
        ``losses(input_ids, last_hidden_state)`` is what is differentiated (e.g. per-sequence loss sums).
        Returns ``∂losses/∂θ · tangent`` per batch. Each block runs ``torch.func.jvp`` on (hidden states,
        θ) with the tangent of its inputs, so (hidden, tangent) pairs flow block by block — one resident
        block at a time, the activations twice (primal and tangent) — and the model's own head ends the
        walk; no autograd graph, no ``.grad``.
        """
        from torch.func import jvp

        first = self.inputs()
        hidden = [batch.hidden for batch in first]
        dual = [torch.zeros_like(h) for h in hidden]
        total = len(self.layers)
        with frozen(list(self.model.parameters())), torch.no_grad():
            for i, layer in enumerate(self.layers):
                with resident(layer):
                    device = execution_device(layer)
                    for b, batch in enumerate(first):
                        on_device = batch.to(device)

                        def through(h: torch.Tensor, theta: torch.Tensor, batch: BlockBatch = on_device,
                                    layer: nn.Module = layer, kind: Any = self.kinds[i]) -> torch.Tensor:
                            bind(theta)
                            return call_block(layer, batch.with_hidden(h), kind)

                        out, tangent = jvp(through, (hidden[b].to(device), primals[b].to(device)),
                                           (dual[b].to(device), tangents[b].to(device)))
                        hidden[b], dual[b] = (out, tangent) if self.store is None else \
                            (out.to(self.store), tangent.to(self.store))
                bind(None)
                self.report(task, i + 1, total)
            results = []
            with head_resident(self.model, self.adapter):
                device = input_device(self.model)
                for b, batch in enumerate(first):
                    ids = batch.input_ids.to(device)

                    def head(h: torch.Tensor, ids: torch.Tensor = ids) -> torch.Tensor:
                        return losses(ids, last_hidden_state(self.model, self.adapter, ids, h))

                    _, directional = jvp(head, (hidden[b].to(device),), (dual[b].to(device),))
                    results.append(directional)
        return results

    def weight_gradients(
        self,
        linears_of: Callable[[nn.Module], Sequence[nn.Linear]],
        per_block: Callable[[Block, dict[nn.Linear, torch.Tensor], dict[nn.Linear, torch.Tensor] | None], T],
        layers: Iterable[int],
        *,
        whole_model: bool = False,
        per_sequence: bool = False,
    ) -> tuple[dict[int, T], int]:
        """∂(mean calibration loss)/∂W of ``linears_of(layer)`` for each block in ``layers``, handed to
        ``per_block(block, gradients, squares)`` while the block is resident; returns the results and
        the number of forward passes spent.

        Block-local by default (:meth:`backward`: one block's gradients at a time, memory of a forward
        pass). ``whole_model``: plain back-propagation through the resident model (the reference whose
        memory ``compare`` shows; offloaded models always go block by block). ``per_sequence``: also the
        mean over sequences of squared per-sequence gradients (the diagonal Fisher).
        """
        chosen = sorted(layers)
        if whole_model and not self.offloaded:
            linears = {i: list(linears_of(self.layers[i])) for i in chosen}
            flat = [linear for i in chosen for linear in linears[i]]
            found = model_gradients(self.model, self.calibration, [lin.weight for lin in flat], per_sequence,
                                    self.progress)
            grads = dict(zip(flat, found.gradient, strict=True))
            squares = dict(zip(flat, found.squares, strict=True)) if found.squares is not None else None

            def score(block: Block) -> T:
                mine = linears[block.index]
                return per_block(block, {lin: grads[lin] for lin in mine},
                                 {lin: squares[lin] for lin in mine} if squares is not None else None)

            return self.each(score, chosen, "scores"), found.forward_passes
        run = self
        if per_sequence:
            one = CalibrationSet(self.calibration.input_ids, batch_size=1)
            run = Sequential(self.model, self.adapter, one, activations_device=self.store,
                             progress=self.progress)
        probe = _WeightProbe(self, linears_of, per_block, chosen, per_sequence)
        run.backward(probe, chosen[0])
        return probe.results, 2


class _WeightProbe:
    """Turns on grad for one block's weights while it is recomputed; sums their gradients over the
    batches; hands them to the caller when the block is done and drops them."""

    def __init__(self, run: Sequential, linears_of: Callable[[nn.Module], Sequence[nn.Linear]],
                 per_block: Callable[..., Any], layers: Sequence[int], per_sequence: bool) -> None:
        self.run, self.linears_of, self.per_block = run, linears_of, per_block
        ids = run.calibration.input_ids
        self.total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        self.tokens_per_sequence, self.sequences = ids.shape[1] - 1, ids.shape[0]
        self.scored, self.per_sequence = set(layers), per_sequence
        self.sums: dict[nn.Linear, torch.Tensor] = {}
        self.squares: dict[nn.Linear, torch.Tensor] = {}
        self.results: dict[int, Any] = {}

    @contextmanager
    def attach(self, index: int, layer: nn.Module, batch: BlockBatch) -> Iterator[list[torch.Tensor]]:
        if index not in self.scored:
            yield []
            return
        weights = [linear.weight for linear in self.linears_of(layer)]
        try:
            for weight in weights:
                weight.requires_grad_(True)
            yield weights
        finally:
            for weight in weights:
                weight.requires_grad_(False)

    def receive(self, index: int, batch: BlockBatch, gradients: Sequence[torch.Tensor]) -> None:
        if index not in self.scored:
            return
        for linear, gradient in zip(self.linears_of(self.run.layers[index]), gradients, strict=True):
            gradient = gradient.float()
            if linear in self.sums:
                self.sums[linear].add_(gradient)
            else:
                self.sums[linear] = gradient.clone()
            if self.per_sequence:  # one sequence per batch: its mean-loss gradient, squared
                square = (gradient / self.tokens_per_sequence).pow(2).div_(self.sequences)
                if linear in self.squares:
                    self.squares[linear].add_(square)
                else:
                    self.squares[linear] = square

    def finish(self, index: int, layer: nn.Module) -> None:
        if index not in self.scored:
            return
        linears = list(self.linears_of(layer))
        grads = {linear: self.sums.pop(linear).div_(self.total_tokens) for linear in linears}
        squares = {linear: self.squares.pop(linear) for linear in linears} if self.per_sequence else None
        block = Block(index, layer, self.run.kinds[index], [], self.run.store)
        with torch.no_grad():
            self.results[index] = self.per_block(block, grads, squares)
