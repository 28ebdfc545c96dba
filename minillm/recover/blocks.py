"""``--mode blocks``: block-local reconstruction on the one sequential executor.

Each pruned block is trained (Adam, ``block_steps`` steps over the calibration batches) so that, on the
hidden states the pruned prefix actually produces, its outputs match what the dense model's block of the
same index outputs on those same hidden states: ``min ‖pruned_i(h) − dense_i(h)‖²`` with ``h`` the
outputs of the already-reconstructed pruned blocks 0…i−1. The walk is
:meth:`minillm.calibration.sequential.Sequential.run` over the student (modify-then-advance: the
trained block's outputs feed the next block), so only one student block and the dense block of the same
index are resident, plus the calibration activations; an offloaded teacher (``--teacher-max-memory``)
is loaded one block at a time by the executor's ``resident``. The student itself must be resident
(weights changed inside an offloaded block are dropped when the walk leaves it).

Why the dense block on the pruned inputs, not the dense model's own hidden states: the target then needs
no second walk and no stored per-block outputs of the dense model (memory of one block, as the issue
asks), and each block learns exactly the function it replaces. Local reconstruction of this kind is
reported to match end-to-end fine-tuning at an order of magnitude less data; it has no LM loss, so it
is the low-compute option, not the strongest one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.blocks import BlockBatch, call_block, resident
from minillm.calibration.data import CalibrationSet
from minillm.calibration.sequential import Block, Sequential


def _error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Relative reconstruction error Σ‖out − target‖² / Σ‖target‖² over the calibration batches."""
    num = sum(float((o.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets, strict=True))
    den = sum(float(t.double().pow(2).sum()) for t in targets)
    return num / max(den, 1e-30)


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    adapter: ArchAdapter,
    calibration: CalibrationSet,
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[int, dict[str, float]]:
    """Train every block of ``student`` towards ``teacher``'s block of the same index (module docstring);
    returns ``{block: {"before": error, "after": error}}`` (relative squared errors on the calibration
    batches). ``student`` is changed in place; ``teacher`` is only read."""
    dense_layers = adapter.decoder_layers(teacher)
    generator = torch.Generator().manual_seed(seed)

    def train_block(block: Block) -> dict[str, float]:
        kind = block.kind
        with resident(dense_layers[block.index]), torch.no_grad():
            dense = dense_layers[block.index]
            targets = [call_block(dense, batch.to(block.device), kind).detach() for batch in block.inputs]
        before = _error([b.hidden for b in block.forward()], targets)
        params = [p for p in block.layer.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in params]
        optimizer = torch.optim.Adam(params, lr=lr)
        order = torch.randint(0, len(block.inputs), (steps,), generator=generator).tolist()
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for j in order:
                    batch: BlockBatch = block.inputs[j].to(block.device)
                    loss = nn.functional.mse_loss(call_block(block.layer, batch, kind).float(),
                                                  targets[j].float())
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
                p.grad = None
        after = _error([b.hidden for b in block.forward(advance=True)], targets)
        if log is not None:
            log(f"block {block.index}: reconstruction error {before:.4g} → {after:.4g}")
        return {"before": before, "after": after}

    walk = Sequential(student, adapter, calibration)
    return walk.run(train_block, task="block reconstruction").results


def calibration_from(tokenizer: Any, data: str, samples: int, seq_len: int, seed: int,
                     batch_size: int) -> CalibrationSet:
    """Seeded windows of the training text (the executor's calibration format)."""
    from minillm.calibration.data import calibration_set

    return calibration_set(tokenizer, data, n=samples, seq_len=seq_len, seed=seed, batch_size=batch_size)
