"""A word-level LSTM language model whose layers may have different widths (so it can be pruned).

Why per-layer ``nn.LSTM`` modules instead of one ``nn.LSTM(num_layers=2)``: a multi-layer ``nn.LSTM``
forces every layer to the same hidden size, while hidden-state pruning may keep a different number
of units in each layer. Each layer is still the stock fused ``nn.LSTM`` (cuDNN on GPU, the ATen fused
kernel on CPU), so a pruned model runs on the same fast path as the dense one.

Layout (Zaremba et al. 2014 / AWD-LSTM style): embedding → dropout → LSTM_1 → dropout → … → LSTM_L →
dropout → linear decoder. With ``tie_weights`` the decoder reuses the embedding matrix (Press & Wolf
2017), which requires the last LSTM's width to equal the embedding width; pruning the last layer then
also narrows the embedding (see :mod:`minillm.lstm.groups`).

Randomness is explicit: weights are initialised from a ``torch.Generator`` and dropout draws its masks
from the generator passed to :meth:`LstmLm.forward`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

State = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LstmLmConfig:
    """Shape of an :class:`LstmLm`.

    vocab_size: number of words (including ``<eos>`` and ``<unk>``).
    embed_size: width of the word embedding.
    hidden_sizes: width of each LSTM layer, first to last (a pruned model has uneven widths).
    dropout: dropout on the embedding, between layers and before the decoder (training only).
    tie_weights: decoder weight = embedding weight; requires ``hidden_sizes[-1] == embed_size``.
    """

    vocab_size: int
    embed_size: int = 200
    hidden_sizes: tuple[int, ...] = field(default=(200, 200))
    dropout: float = 0.2
    tie_weights: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.embed_size < 1 or not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError("embed_size and every hidden size must be >= 1 (and at least one layer)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights and self.hidden_sizes[-1] != self.embed_size:
            raise ValueError(
                f"tie_weights needs the last hidden size ({self.hidden_sizes[-1]}) to equal "
                f"embed_size ({self.embed_size})"
            )

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    def input_size(self, layer: int) -> int:
        return self.embed_size if layer == 0 else self.hidden_sizes[layer - 1]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden_sizes"] = list(self.hidden_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LstmLmConfig:
        known = {"vocab_size", "embed_size", "hidden_sizes", "dropout", "tie_weights"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LSTM config keys: {', '.join(sorted(unknown))}")
        return cls(**{**data, "hidden_sizes": tuple(data.get("hidden_sizes", (200, 200)))})


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout whose mask comes from ``generator`` (``F.dropout`` cannot take one)."""
    if p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


class LstmLm(nn.Module):
    """Embedding, a stack of single-layer ``nn.LSTM`` (time-major), and a linear decoder."""

    def __init__(self, config: LstmLmConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        with torch.device("meta"):  # no wasted default init from the global RNG
            self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
            self.rnns = nn.ModuleList(
                nn.LSTM(config.input_size(i), h) for i, h in enumerate(config.hidden_sizes)
            )
            self.decoder = nn.Linear(config.hidden_sizes[-1], config.vocab_size)
        self.to_empty(device="cpu")
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(±0.1) embedding/decoder (Zaremba et al.), Uniform(±1/√H) LSTM as in ``nn.LSTM``."""
        self.embedding.weight.uniform_(-0.1, 0.1, generator=generator)
        if not self.config.tie_weights:
            self.decoder.weight.uniform_(-0.1, 0.1, generator=generator)
        self.decoder.bias.zero_()
        for rnn in self.rnns:
            bound = 1.0 / math.sqrt(rnn.hidden_size)
            for param in rnn.parameters():
                param.uniform_(-bound, bound, generator=generator)

    def init_state(self, batch_size: int) -> State:
        """Zero (h, c) for every layer, shapes (1, B, H_l)."""
        weight = self.decoder.weight
        return [
            (weight.new_zeros(1, batch_size, h), weight.new_zeros(1, batch_size, h))
            for h in self.config.hidden_sizes
        ]

    def forward(
        self,
        ids: torch.Tensor,
        state: State | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Logits (T, B, V) for token ids (T, B), and the final state of every layer."""
        if state is None:
            state = self.init_state(ids.size(1))
        p = self.config.dropout if self.training else 0.0
        x = dropout(self.embedding(ids), p, generator)
        new_state: State = []
        for rnn, layer_state in zip(self.rnns, state, strict=True):
            x, (h, c) = rnn(x, layer_state)
            new_state.append((h, c))
            x = dropout(x, p, generator)
        return self.decoder(x), new_state

    def lstm_stack(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Only the recurrent part (embedded input → last layer output); used to time the LSTM alone."""
        if state is None:
            state = self.init_state(x.size(1))
        for rnn, layer_state in zip(self.rnns, state, strict=True):
            x, _ = rnn(x, layer_state)
        return x


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT windows while carrying the values over."""
    return [(h.detach(), c.detach()) for h, c in state]


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
