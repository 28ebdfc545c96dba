"""Physical removal of LSTM hidden units, its masked twin, and a check of the fused kernel.

Removing unit j of an LSTM layer of width H means deleting rows ``j, H+j, 2H+j, 3H+j`` of
``weight_ih``/``weight_hh``/``bias_ih``/``bias_hh`` (PyTorch's i, f, g, o gate blocks), column j of
``weight_hh`` and column j of whatever reads the layer's output. The result is a stock ``nn.LSTM`` of
width H' < H, so it runs on the same fused kernel (cuDNN on GPU, ATen's fused LSTM on CPU) as before.

Why removal is exact: if a unit's four gate rows and biases are zero, its pre-activations are 0, so
i = f = o = σ(0) = ½ and g = tanh(0) = 0; from a zero state c_t = ½·c_{t−1} + ½·0 = 0 and h_t = 0 for
all t. The unit then contributes nothing to anyone, which is what :func:`mask_plan` builds and what the
tests compare the smaller model against.

Pure slicing lives in :func:`slice_lstm_layer`; :func:`prune_lstm` handles any (multi-layer,
unidirectional) ``nn.LSTM``; :func:`apply_plan` handles :class:`~minillm.lstm.model.LstmLm`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from minillm.lstm.groups import GATES, unit_groups, unit_positions
from minillm.lstm.model import LstmLm, LstmLmConfig
from minillm.lstm.plan import PrunePlan

LayerWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def slice_lstm_layer(
    weights: LayerWeights, keep_out: torch.Tensor, keep_in: torch.Tensor | None = None
) -> LayerWeights:
    """Keep hidden units ``keep_out`` (in all four gates) and input features ``keep_in`` of one layer.

    ``weights`` is ``(weight_ih, weight_hh, bias_ih, bias_hh)`` in PyTorch's layout (biases may be
    None). Returns new contiguous tensors.
    """
    w_ih, w_hh, b_ih, b_hh = weights
    hidden = w_hh.shape[1]
    rows = unit_positions(keep_out.to(w_ih.device), hidden, GATES)
    w_ih = w_ih.index_select(0, rows)
    if keep_in is not None:
        w_ih = w_ih.index_select(1, keep_in.to(w_ih.device))
    w_hh = w_hh.index_select(0, rows).index_select(1, keep_out.to(w_hh.device))
    b_ih = None if b_ih is None else b_ih.index_select(0, rows)
    b_hh = None if b_hh is None else b_hh.index_select(0, rows)
    return (
        w_ih.contiguous(),
        w_hh.contiguous(),
        None if b_ih is None else b_ih.contiguous(),
        None if b_hh is None else b_hh.contiguous(),
    )


def _layer_weights(lstm: nn.LSTM, layer: int) -> LayerWeights:
    get = lambda kind: getattr(lstm, f"{kind}_l{layer}", None)
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")


@torch.no_grad()
def prune_lstm(
    lstm: nn.LSTM, keep: Sequence[torch.Tensor], keep_input: torch.Tensor | None = None
) -> nn.LSTM:
    """A new, smaller ``nn.LSTM`` keeping hidden units ``keep[k]`` of layer k (and inputs ``keep_input``).

    A multi-layer ``nn.LSTM`` has one hidden size for all layers, so every ``keep[k]`` must have the same
    length (use one single-layer LSTM per layer, as :class:`LstmLm` does, for uneven widths). Layer k > 0
    reads layer k−1's output, so its input columns follow ``keep[k−1]``.
    """
    if lstm.bidirectional or lstm.proj_size:
        raise NotImplementedError("hidden-unit pruning supports unidirectional LSTMs without proj_size")
    if len(keep) != lstm.num_layers:
        raise ValueError(f"need one keep list per layer ({lstm.num_layers}), got {len(keep)}")
    widths = {int(k.numel()) for k in keep}
    if len(widths) != 1:
        raise ValueError(f"a multi-layer nn.LSTM needs equal widths per layer, got {sorted(widths)}")
    hidden = widths.pop()
    ref = lstm.weight_ih_l0
    input_size = lstm.input_size if keep_input is None else int(keep_input.numel())
    new = nn.LSTM(
        input_size,
        hidden,
        num_layers=lstm.num_layers,
        bias=lstm.bias,
        batch_first=lstm.batch_first,
        dropout=lstm.dropout,
        device="meta",
        dtype=ref.dtype,
    ).to_empty(device=ref.device)
    for layer in range(lstm.num_layers):
        keep_in = keep_input if layer == 0 else keep[layer - 1]
        sliced = slice_lstm_layer(_layer_weights(lstm, layer), keep[layer], keep_in)
        for kind, tensor in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), sliced, strict=True):
            if tensor is not None:
                getattr(new, f"{kind}_l{layer}").copy_(tensor)
    new.flatten_parameters()
    new.train(lstm.training)
    return new


def pruned_config(config: LstmLmConfig, plan: PrunePlan) -> LstmLmConfig:
    """The model config after ``plan``: new widths; a tied embedding narrows with the last layer."""
    sizes = plan.kept_sizes
    embed = sizes[-1] if config.tie_weights else config.embed_size
    return LstmLmConfig(
        vocab_size=config.vocab_size,
        embed_size=embed,
        hidden_sizes=sizes,
        dropout=config.dropout,
        tie_weights=config.tie_weights,
    )


def _check_plan(model: LstmLm, plan: PrunePlan) -> None:
    if tuple(plan.original_sizes) != tuple(model.config.hidden_sizes):
        raise ValueError(
            f"plan was made for hidden sizes {list(plan.original_sizes)}, "
            f"model has {list(model.config.hidden_sizes)}"
        )


@torch.no_grad()
def apply_plan(model: LstmLm, plan: PrunePlan) -> LstmLm:
    """A new, physically smaller :class:`LstmLm` holding only the units ``plan`` keeps."""
    _check_plan(model, plan)
    config = model.config
    keep = [plan.keep_tensor(layer) for layer in range(config.num_layers)]
    last = keep[-1]
    new = LstmLm(pruned_config(config, plan))
    emb = model.embedding.weight
    new.embedding.weight.copy_(emb[:, last] if config.tie_weights else emb)
    for layer, rnn in enumerate(model.rnns):
        keep_in = (last if config.tie_weights else None) if layer == 0 else keep[layer - 1]
        new.rnns[layer] = prune_lstm(rnn, [keep[layer]], keep_in)
    if not config.tie_weights:
        new.decoder.weight.copy_(model.decoder.weight[:, last])
    new.decoder.bias.copy_(model.decoder.bias)
    new.train(model.training)
    return new


@torch.no_grad()
def mask_plan(model: LstmLm, plan: PrunePlan, only_rows: bool = False) -> LstmLm:
    """A dense copy of ``model`` with the pruned units' weights set to zero (same shapes).

    With ``only_rows`` only the four gate rows and biases are zeroed, which already silences the unit
    exactly (see the module docstring); otherwise its columns are zeroed as well.
    """
    _check_plan(model, plan)
    masked = copy.deepcopy(model)
    for group in unit_groups(model.config):
        kept = plan.keep_tensor(group.layer)
        dropped = torch.ones(group.size, dtype=torch.bool)
        dropped[kept] = False
        dropped_idx = dropped.nonzero().flatten()
        for piece in group.slices:
            if only_rows and piece.dim != 0:
                continue
            param = masked.get_parameter(piece.name)
            param.index_fill_(piece.dim, unit_positions(dropped_idx, group.size, piece.gates), 0.0)
    for rnn in masked.rnns:
        rnn.flatten_parameters()
    return masked


def reference_lstm(
    x: torch.Tensor,
    layers: Sequence[LayerWeights],
    state: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The LSTM equations written out step by step (time-major x of shape (T, B, in)).

    i, f, g, o = chunks of x W_ihᵀ + b_ih + h W_hhᵀ + b_hh; c ← σ(f)c + σ(i)tanh(g); h ← σ(o)tanh(c).
    Independent of any fused kernel, so comparing against it checks the gate layout after surgery.
    """
    out = x
    for index, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        hidden = w_hh.shape[1]
        if state is None:
            h = out.new_zeros(out.shape[1], hidden)
            c = out.new_zeros(out.shape[1], hidden)
        else:
            h, c = state[index][0][0], state[index][1][0]
        steps = []
        for x_t in out:
            gates = x_t @ w_ih.t() + h @ w_hh.t()
            if b_ih is not None and b_hh is not None:
                gates = gates + b_ih + b_hh
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            steps.append(h)
        out = torch.stack(steps)
    return out


@torch.no_grad()
def check_fused(
    lstm: nn.LSTM, seq_len: int = 7, batch: int = 3, generator: torch.Generator | None = None
) -> dict[str, float]:
    """Run ``lstm`` through its fused kernel on its (new) shapes and compare with :func:`reference_lstm`.

    Returns the max absolute difference per backend tried: always ``cpu``; ``cuda`` (cuDNN when it is
    enabled) when a GPU is present. Raises if the fused call itself fails on the shapes.
    """
    if lstm.batch_first or lstm.bidirectional or lstm.proj_size:
        raise NotImplementedError("check_fused expects a time-major, unidirectional LSTM")
    dtype = lstm.weight_ih_l0.dtype
    x = torch.randn(seq_len, batch, lstm.input_size, generator=generator, dtype=dtype)
    layers = [tuple(t.detach().cpu() if t is not None else None for t in _layer_weights(lstm, k))
              for k in range(lstm.num_layers)]
    expected = reference_lstm(x, layers)  # type: ignore[arg-type]
    results = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        module = copy.deepcopy(lstm).to(device).eval()
        module.flatten_parameters()
        out, _ = module(x.to(device))
        results[device] = float((out.cpu() - expected).abs().max())
    return results
