"""Pruning models larger than memory: which criteria stream, how much one block needs, where offload goes.

``minillm prune --streaming --max-memory cpu=4GiB`` loads the model with accelerate (``device_map``,
``max_memory``, disk offload; safetensors checkpoints are read in place, nothing is copied), scores it
one resident block at a time (:mod:`minillm.calibration.blocks`) and exports it block by block
(:mod:`minillm.streaming_export`).

In streaming mode ``--max-memory`` is the budget of the whole process on the compute device: before
loading, minillm reserves room for one loaded block, a loaded copy of the embeddings / LM head, the
calibration activations and (on CPU) the Python runtime itself, and gives accelerate the rest for the
weights it may keep resident. A cap that cannot hold that reserve is refused with the figure it needs.
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

    @property
    def reserve(self) -> int:
        return self.block + self.head + self.activations + self.runtime

    def describe(self) -> str:
        from minillm.memory import human_bytes

        return (
            f"one decoder block {human_bytes(self.block)} + embeddings/LM head {human_bytes(self.head)} + "
            f"calibration activations {human_bytes(self.activations)} + runtime {human_bytes(self.runtime)}"
        )


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


def streaming_max_memory(max_memory: dict[Any, Any] | None, budget: BlockBudget) -> dict[Any, Any] | None:
    """``max_memory`` for accelerate: the compute device's cap minus the streaming reserve.

    Raises a :class:`UsageError` naming the smallest workable cap when one block does not fit.
    """
    from accelerate.utils import convert_file_size_to_int

    if not max_memory:
        return max_memory
    key = _compute_key(max_memory)
    if key not in max_memory:
        return max_memory
    cap = (
        convert_file_size_to_int(max_memory[key])
        if isinstance(max_memory[key], str)
        else int(max_memory[key])
    )
    reserve = budget.reserve if key == "cpu" else budget.reserve - budget.runtime
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
) -> tuple[dict | None, str]:
    """``max_memory`` and offload folder for ``load_model`` in streaming mode (checks the cap first)."""
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
        memory = streaming_max_memory(memory, budget)
    return memory, offload_dir or default_offload_dir()
