"""DST-masked layers for ``nn.Linear``, ``nn.Conv2d`` and ``nn.LSTM``, and the glue to use them on any model.

Dynamic Sparse Training trains weights and a per-output-unit threshold together; the mask
S(|W| − t) prunes and revives weights at every step (math and exact formulas: :mod:`dst_math`). This
module only wires that math into layers:

* :class:`MaskedLinear` / :class:`MaskedConv2d` subclass the torch layers (same attributes, same
  parameter names, plus ``threshold`` of shape (out,)); a threshold per neuron / filter as in the paper.
* :class:`MaskedLSTM` wraps an ``nn.LSTM`` and masks each ``weight_ih_l{k}`` / ``weight_hh_l{k}`` with
  its own threshold vector of shape (4H,) — one per gate row, as the reference ``MaskedLSTMCell`` has
  one threshold per gate and output unit. The masked weights go through ``torch.func.functional_call``
  so the stock fused LSTM kernel still runs. The reset rule applies per weight matrix.
* :func:`sparsify` swaps every Linear / Conv2d / LSTM of any ``nn.Module`` (LSTM LMs, the ResNets and
  VGGs of ``minillm.vision``, …) for its masked twin, sharing the original parameters;
  :func:`dst_penalty` is the α-free regulariser Σ exp(−t); :func:`sparsity_report` lists what each
  layer learned; :func:`densify` bakes the masks in and restores plain torch layers for export.

Note on tied weights: a masked decoder shares its weight with the embedding, whose lookup stays dense.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from minillm.lstm.dst_math import masked_weight, sparsity_penalty, threshold_mask

KINDS = ("linear", "conv2d", "lstm")


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is W ⊙ S(|W| − t), t trainable, one entry per output feature."""

    threshold: nn.Parameter

    @classmethod
    def from_dense(cls, dense: nn.Linear) -> MaskedLinear:
        new = cls(dense.in_features, dense.out_features, bias=dense.bias is not None, device="meta")
        new.weight = dense.weight
        new.bias = dense.bias
        new.threshold = nn.Parameter(torch.zeros(dense.out_features, device=dense.weight.device))
        new.train(dense.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, masked_weight(self.weight, self.threshold), self.bias)

    def masks(self) -> dict[str, torch.Tensor]:
        return {"weight": threshold_mask(self.weight, self.threshold).detach()}

    def thresholds(self) -> dict[str, nn.Parameter]:
        return {"weight": self.threshold}

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters, with the mask multiplied in."""
        self.weight.mul_(self.masks()["weight"])
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is W ⊙ S(|W| − t), t trainable, one entry per output filter."""

    threshold: nn.Parameter

    @classmethod
    def from_dense(cls, dense: nn.Conv2d) -> MaskedConv2d:
        new = cls(
            dense.in_channels,
            dense.out_channels,
            dense.kernel_size,  # type: ignore[arg-type]
            stride=dense.stride,  # type: ignore[arg-type]
            padding=dense.padding,  # type: ignore[arg-type]
            dilation=dense.dilation,  # type: ignore[arg-type]
            groups=dense.groups,
            bias=dense.bias is not None,
            padding_mode=dense.padding_mode,
            device="meta",
        )
        new.weight = dense.weight
        new.bias = dense.bias
        new.threshold = nn.Parameter(torch.zeros(dense.out_channels, device=dense.weight.device))
        new.train(dense.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, masked_weight(self.weight, self.threshold), self.bias)

    def masks(self) -> dict[str, torch.Tensor]:
        return {"weight": threshold_mask(self.weight, self.threshold).detach()}

    def thresholds(self) -> dict[str, nn.Parameter]:
        return {"weight": self.threshold}

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's parameters, with the mask multiplied in."""
        self.weight.mul_(self.masks()["weight"])
        plain = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,  # type: ignore[arg-type]
            stride=self.stride,  # type: ignore[arg-type]
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,  # type: ignore[arg-type]
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)


class MaskedLSTM(nn.Module):
    """An ``nn.LSTM`` whose ``weight_ih_l{k}`` / ``weight_hh_l{k}`` are masked by per-gate-row thresholds."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.proj_size:
            raise NotImplementedError("DST masking of LSTMs with proj_size is not supported")
        self.lstm = lstm
        self._weight_names = [n for n in lstm._flat_weights_names if n.startswith("weight_")]
        for name in self._weight_names:
            weight = getattr(lstm, name)
            self.register_parameter(
                self._threshold_name(name), nn.Parameter(torch.zeros(weight.shape[0], device=weight.device))
            )

    @staticmethod
    def _threshold_name(weight_name: str) -> str:
        return "threshold_" + weight_name[len("weight_") :]

    # nn.LSTM's public attributes, so code that reads them keeps working on the masked layer.
    input_size = property(lambda self: self.lstm.input_size)
    hidden_size = property(lambda self: self.lstm.hidden_size)
    num_layers = property(lambda self: self.lstm.num_layers)
    batch_first = property(lambda self: self.lstm.batch_first)
    bidirectional = property(lambda self: self.lstm.bidirectional)
    proj_size = property(lambda self: self.lstm.proj_size)

    def flatten_parameters(self) -> None:
        self.lstm.flatten_parameters()

    def thresholds(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, self._threshold_name(n)) for n in self._weight_names}

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: threshold_mask(getattr(self.lstm, n), t).detach() for n, t in self.thresholds().items()}

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        weights = {n: masked_weight(getattr(self.lstm, n), t) for n, t in self.thresholds().items()}
        args = (x,) if hx is None else (x, hx)
        return functional_call(self.lstm, weights, args, strict=False)

    def to_dense(self) -> nn.LSTM:
        """The wrapped ``nn.LSTM`` with the current masks multiplied into its weights."""
        with torch.no_grad():
            for name, mask in self.masks().items():
                getattr(self.lstm, name).mul_(mask)
        self.lstm.flatten_parameters()
        return self.lstm


MASKED_TYPES = (MaskedLinear, MaskedConv2d, MaskedLSTM)


def _masked_twin(module: nn.Module, kinds: Collection[str]) -> nn.Module | None:
    if isinstance(module, MASKED_TYPES):
        return None
    if "linear" in kinds and type(module) is nn.Linear:
        return MaskedLinear.from_dense(module)
    if "conv2d" in kinds and type(module) is nn.Conv2d:
        return MaskedConv2d.from_dense(module)
    if "lstm" in kinds and type(module) is nn.LSTM:
        return MaskedLSTM(module)
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def sparsify(model: nn.Module, kinds: Collection[str] = KINDS, skip: Collection[str] = ()) -> list[str]:
    """Swap every plain Linear / Conv2d / LSTM of ``model`` (in place) for its DST-masked twin.

    ``kinds`` picks among ``linear``, ``conv2d``, ``lstm``; ``skip`` lists module names to leave dense
    (e.g. a classifier head). Parameters are shared, not copied, so an optimizer built afterwards sees
    the weights plus the new thresholds. Returns the names of the swapped modules.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown DST layer kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or name in skip or any(name.startswith(s + ".") for s in swapped):
            continue
        twin = _masked_twin(module, kinds)
        if twin is not None:
            _replace(model, name, twin)
            swapped.append(name)
    if not swapped:
        raise ValueError("sparsify found no Linear, Conv2d or LSTM layer to mask")
    return swapped


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, MASKED_TYPES):
            yield name, module


def dst_thresholds(model: nn.Module) -> list[nn.Parameter]:
    return [t for _, m in masked_modules(model) for t in m.thresholds().values()]  # type: ignore[operator]


def dst_penalty(model: nn.Module) -> torch.Tensor:
    """Σ exp(−t) over all thresholds of the model's masked layers (the loss adds α times this)."""
    return sparsity_penalty(dst_thresholds(model))


@dataclass
class LayerSparsity:
    """What DST learned for one masked weight: kept fraction, empty output rows, thresholds."""

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int
    empty_rows: int
    threshold_mean: float
    threshold_max: float
    per_gate: dict[str, float] = field(default_factory=dict)

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)


def sparsity_report(model: nn.Module) -> list[LayerSparsity]:
    """Per masked weight: density, rows with no weight left, thresholds; LSTM rows split by gate."""
    rows = []
    with torch.no_grad():
        for name, module in masked_modules(model):
            thresholds = module.thresholds()  # type: ignore[operator]
            for weight_name, mask in module.masks().items():  # type: ignore[operator]
                flat = mask.reshape(mask.shape[0], -1)
                t = thresholds[weight_name]
                entry = LayerSparsity(
                    name=f"{name}.{weight_name}",
                    shape=tuple(mask.shape),
                    kept=int(mask.sum()),
                    total=mask.numel(),
                    empty_rows=int((flat.sum(dim=1) == 0).sum()),
                    threshold_mean=float(t.mean()),
                    threshold_max=float(t.max()),
                )
                if isinstance(module, MaskedLSTM):
                    gates = flat.reshape(4, -1)
                    entry.per_gate = {g: float(gates[k].mean()) for k, g in enumerate("ifgo")}
                rows.append(entry)
    return rows


def overall_density(report: list[LayerSparsity]) -> float:
    return sum(r.kept for r in report) / max(sum(r.total for r in report), 1)


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace masked layers by plain torch layers with W ⊙ M baked in (pruned weights become 0)."""
    for name, module in list(masked_modules(model)):
        _replace(model, name, module.to_dense())  # type: ignore[operator]
    return model
