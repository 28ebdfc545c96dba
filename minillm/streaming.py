"""Pruning models larger than memory: which criteria stream, how much one block needs, where offload goes.

``minillm prune --streaming --max-memory cpu=4GiB`` loads the model with accelerate (``device_map``,
``max_memory``, disk offload; safetensors checkpoints are read in place, nothing is copied), scores it
one resident block at a time (:mod:`minillm.calibration.blocks`) and exports it block by block
(:mod:`minillm.streaming_export`).

In streaming mode ``--max-memory`` is the budget of the whole process on the compute device: before
loading, minillm reserves room for one loaded block, a loaded copy of the embeddings / LM head, the
calibration activations and (on CPU) the Python runtime itself, and gives accelerate the rest for the
weights it may keep resident. A cap that cannot hold that reserve is refused with the figure it needs.

The compensation pass (``--compensation refit``) needs the moments ``H`` of the widest closing
projection's inputs and their solve (:func:`compensation_bytes`); it runs after scoring and before the
export, so it shares the room reserved for the embeddings / LM head and adds to the reserve only what
exceeds it. When float64 moments would leave less than half the cap for weights, ``H`` is kept in float32
(half the memory; :func:`choose_precision`), and the export's recipe records it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from minillm.errors import UsageError

#: Criteria that never evaluate the model's loss (no LM head resident with a batch of logits).
WITHOUT_LOSS = frozenset({"magnitude", "magnitude-l2", "random", "wanda-sp", "flap", "fms-local", "obs"})

#: Criteria that keep every block's calibration inputs for a block-local backward pass.
KEEPS_BLOCK_INPUTS = frozenset({"taylor", "taylor-fisher", "taylor-vector", "taylor-lowmem", "taylor-gate",
                                "taylor-gate-fisher", "taylor-gate-fms", "fms-bp", "fms-lowmem"})

#: Criteria that walk the blocks in forward mode (every intermediate has a tangent beside it).
FORWARD_MODE = frozenset({"fwd-grad"})

GiB = 1024**3


@dataclass(frozen=True)
class BlockBudget:
    """What streaming needs beyond the weights accelerate keeps resident (bytes)."""

    block: int
    head: int
    activations: int
    runtime: int
    compensation: int = 0  # the refit's working set, in ``precision``
    precision: str = "float64"

    @property
    def reserve(self) -> int:
        """The compensation pass and the head's phases (scoring with the loss, export) never overlap."""
        return self.block + max(self.head, self.compensation) + self.activations + self.runtime

    def describe(self) -> str:
        from minillm.memory import human_bytes

        shared = f"embeddings/LM head {human_bytes(self.head)}"
        if self.compensation:
            shared = f"max(embeddings/LM head {human_bytes(self.head)}, compensation " \
                     f"{human_bytes(self.compensation)})"
        return (
            f"one decoder block {human_bytes(self.block)} + {shared} + "
            f"calibration activations {human_bytes(self.activations)} + runtime {human_bytes(self.runtime)}"
        )


def compensation_bytes(config: Any, precision: str, tokens: int, dense_tokens: int = 0,
                       activation_size: int = 4, block_tokens: int = 0) -> int:
    """Peak working set of the refit of the widest closing projection (``in`` = MLP or attention width,
    ``out`` = hidden size): ``H``, factored in its own storage, and the solve's ``in × out`` blocks,
    bounded by ``(in² + 3·in·out)`` elements of ``precision`` (a 6,912-wide float64 down_proj: 0.70 GB
    measured by ``tools/bench_refit_memory.py``, 0.81 GB bounded), plus one batch's inputs in float64
    while ``H`` accumulates (the copy a float64 ``H`` makes; a float32 ``H`` makes none, so this bounds it).

    ``dense_tokens`` (the dense-output target: every calibration token): the target moments ``E``
    (``in × out``) and a converted copy of it for the solve, the dense stream between blocks and one
    block's dense closing inputs, in ``activation_size`` bytes. ``block_tokens`` (the block target: every
    calibration token): ``E`` and its copy (``2·in·out``), the dense block's outputs for every token
    (``activation_size`` bytes) and one batch's output error in float64."""
    from minillm.arch import adapter_for

    adapter = adapter_for(config)
    out = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or out // heads)
    mlp = adapter.intermediate_size(config)
    width = max(mlp, heads * head_dim)
    size = 4 if precision == "float32" else 8
    working = (width * width + 3 * width * out) * size + tokens * width * 8
    if dense_tokens:
        working += 2 * width * out * size + dense_tokens * (out + mlp + heads * head_dim) * activation_size
    if block_tokens:
        working += 2 * width * out * size + block_tokens * out * activation_size + tokens * out * 8
    return working


def choose_precision(budget: BlockBudget, config: Any, precision: str, tokens: int,
                     max_memory: dict[Any, Any] | None, dense_tokens: int = 0,
                     activation_size: int = 4, block_tokens: int = 0) -> BlockBudget:
    """``budget`` with the compensation's working set in the requested ``precision``; for ``auto``,
    float64 unless its reserve would exceed half of the compute device's cap (then float32: room for
    the weights beats the last bits of ``H``, which the damping dominates)."""
    from dataclasses import replace

    found = _device_cap(max_memory)
    for choice in ("float64", "float32") if precision == "auto" else (precision,):
        working = compensation_bytes(config, choice, tokens, dense_tokens, activation_size, block_tokens)
        chosen = replace(budget, compensation=working, precision=choice)
        if found is None or _reserve_on(found[0], chosen) <= found[1] // 2:
            break
    return chosen


def block_budget(
    config: Any,
    dtype: torch.dtype,
    batch_size: int,
    seq_len: int,
    samples: int,
    runtime_bytes: int,
    with_loss: bool = True,
    keeps_block_inputs: bool = False,
    forward_mode: bool = False,
) -> BlockBudget:
    """Sizes from a weightless model built from ``config`` (accelerate's ``compute_module_sizes``).

    ``with_loss``: the criterion evaluates the model's loss (SPSA full loss), so the embeddings, final
    norm and LM head are loaded together and the logits of a batch exist; otherwise only the largest of
    them is ever loaded at once (by the export) and no logits are made. ``keeps_block_inputs``: the
    criterion back-propagates block by block and keeps every block's calibration inputs until then.
    ``forward_mode``: the criterion runs ``jvp`` (a tangent beside every activation: twice the working
    memory of a forward pass, an estimate) and keeps the hidden states' tangents between blocks.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    from minillm.arch import adapter_for
    from minillm.calibration.blocks import non_block_modules

    adapter = adapter_for(config)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sizes = compute_module_sizes(meta, dtype=dtype)
    names = {id(m): n for n, m in meta.named_modules()}
    block = max(sizes[names[id(layer)]] for layer in adapter.decoder_layers(meta))
    others = [sizes[names[id(m)]] for m in non_block_modules(meta, adapter)] or [0]
    head = sum(others) if with_loss else max(others)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    tokens = batch_size * seq_len
    working = tokens * (8 * hidden + 3 * adapter.intermediate_size(config) + heads * seq_len) * size
    if with_loss:
        working += tokens * int(config.vocab_size) * 4 * 3  # logits, log-softmax, loss temporaries
    streams = 4 * samples * seq_len * hidden * size  # first-block inputs, "+"/"−" streams, outputs
    if keeps_block_inputs:
        streams += int(config.num_hidden_layers) * samples * seq_len * hidden * size
    if forward_mode:
        working *= 2
        streams += 2 * samples * seq_len * hidden * size
    return BlockBudget(block=block, head=head, activations=working + streams, runtime=runtime_bytes)


def _compute_key(max_memory: dict[Any, Any]) -> Any:
    """The device whose cap the reserve comes from: the first GPU listed, else ``cpu``."""
    gpus = [k for k in max_memory if isinstance(k, int) or str(k).startswith(("cuda", "xpu", "mps"))]
    return gpus[0] if gpus and torch.cuda.is_available() else "cpu"


def _device_cap(max_memory: dict[Any, Any] | None) -> tuple[Any, int] | None:
    """The compute device's key in ``max_memory`` and its cap in bytes (``None``: no cap for it)."""
    from accelerate.utils import convert_file_size_to_int

    if not max_memory:
        return None
    key = _compute_key(max_memory)
    if key not in max_memory:
        return None
    value = max_memory[key]
    return key, convert_file_size_to_int(value) if isinstance(value, str) else int(value)


def _reserve_on(key: Any, budget: BlockBudget) -> int:
    """The reserve on the compute device (the Python runtime lives in CPU memory only)."""
    return budget.reserve if key == "cpu" else budget.reserve - budget.runtime


def streaming_max_memory(max_memory: dict[Any, Any] | None, budget: BlockBudget) -> dict[Any, Any] | None:
    """``max_memory`` for accelerate: the compute device's cap minus the streaming reserve.

    Raises a :class:`UsageError` naming the smallest workable cap when one block does not fit.
    """
    found = _device_cap(max_memory)
    if found is None:
        return max_memory
    key, cap = found
    reserve = _reserve_on(key, budget)
    if cap <= reserve:
        need = (reserve + 256 * 1024**2) / GiB
        raise UsageError(
            f"--max-memory {key}={max_memory[key]} is too small for block-by-block pruning: it needs "
            f"{budget.describe()}; give at least {key}={need:.1f}GiB (or lower --batch-size)"
        )
    return {**max_memory, key: cap - reserve}


def default_offload_dir() -> str:
    """A temporary folder for accelerate's disk offload, removed when the process exits.

    Safetensors checkpoints are offloaded in place (transformers reads them from the checkpoint files),
    so this folder stays empty for them; other formats are written here.
    """
    folder = tempfile.mkdtemp(prefix="minillm-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _config_dtype(config: Any, dtype: Any) -> torch.dtype:
    from minillm.loading import parse_dtype

    chosen = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if chosen == "auto":
        chosen = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(chosen, str):
            chosen = getattr(torch, chosen)
    return chosen


def prepare_streaming_load(
    criterion: str,
    source: str,
    max_memory: str | dict | None,
    offload_dir: str | None,
    dtype: Any,
    batch_size: int,
    seq_len: int,
    samples: int,
    gram: bool = False,
    precision: str = "auto",
    target: str = "pruned",
) -> tuple[dict | None, str, str]:
    """``max_memory`` and offload folder for ``load_model`` in streaming mode (checks the cap first),
    and the dtype of the compensation's moments (``gram``: the compensation solves against ``H``;
    ``precision``: the recipe's ``compensation_precision``, returned as given when no cap decides it;
    ``target``: the refit's target; ``dense`` also holds the dense stream and the target moments,
    ``block`` the dense block's outputs and the target moments)."""
    from transformers import AutoConfig

    from minillm.memory import rss_bytes
    from minillm.option_checks import parse_max_memory

    memory = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    if memory:
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:
            raise UsageError(
                f"cannot load a model config from {source!r}: {str(exc).splitlines()[0]}"
            ) from exc
        budget = block_budget(
            config,
            _config_dtype(config, dtype),
            batch_size,
            seq_len,
            samples,
            rss_bytes(),
            with_loss=criterion not in WITHOUT_LOSS,
            keeps_block_inputs=criterion in KEEPS_BLOCK_INPUTS,
            forward_mode=criterion in FORWARD_MODE,
        )
        if gram:
            dtype_size = torch.finfo(_config_dtype(config, dtype)).bits // 8
            tokens = samples * seq_len
            budget = choose_precision(budget, config, precision, batch_size * seq_len, memory,
                                      tokens if target == "dense" else 0, dtype_size,
                                      tokens if target == "block" else 0)
            precision = budget.precision
        memory = streaming_max_memory(memory, budget)
    return memory, offload_dir or default_offload_dir(), precision
