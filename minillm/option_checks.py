"""Option checks that run before a model is loaded, so a typo costs a second, not a scoring run.

Why here: ``--max-shard-size banana`` used to fail only when the export began (after scoring),
``--device-map cuda:7`` on a CPU build and ``--max-memory cpu=lots`` deep inside accelerate, a huge
``--seed`` inside numpy. Each check raises a one-line :class:`~minillm.errors.UsageError` naming the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from minillm.errors import UsageError

MAX_SEED = 2**32 - 1  # numpy's and lm-eval's seeds are 32-bit
DEVICE_MAP_WORDS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "mps", "disk")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_TAYLOR = "minillm.scoring.taylor:TaylorOptions"
_GATE = "minillm.scoring.taylor_gate:TaylorGateOptions"
#: criterion → its typed options dataclass (what ``ScoringContext.options_as`` reads); the others take none
CRITERION_OPTIONS: dict[str, str] = {
    "fwd-grad": "minillm.scoring.fwd_grad:FwdGradOptions",
    "taylor": _TAYLOR, "taylor-fisher": _TAYLOR, "taylor-vector": _TAYLOR, "taylor-lowmem": _TAYLOR,
    "taylor-gate": _GATE, "taylor-gate-fisher": _GATE, "taylor-gate-fms": _GATE,
}


def check_seed(seed: int | None, option: str = "--seed") -> None:
    if seed is not None and not 0 <= int(seed) <= MAX_SEED:
        raise UsageError(f"{option} must be between 0 and {MAX_SEED} (got {seed})")


def check_choice(value: str, allowed: tuple[str, ...], option: str) -> None:
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)} (got {value!r})")


def check_positive(value: int | None, option: str, minimum: int = 1) -> None:
    if value is not None and int(value) < minimum:
        raise UsageError(f"{option} must be at least {minimum} (got {value})")


def check_size(value: str | int | None, option: str) -> None:
    """``5GB``, ``500MiB``, ``1000000`` (bytes): accelerate's size format, positive."""
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"{option} must be positive (got {value})")
        return
    if not isinstance(value, str) or not _SIZE.match(value) or float(re.sub(r"[^\d.]", "", value)) <= 0:
        raise UsageError(f"{option} takes a size like 5GB, 500MB or 2GiB (got {value!r})")


def _check_cuda_index(index: int, option: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"{option} names a CUDA device but this torch build has none; use cpu or auto")
    if index >= torch.cuda.device_count():
        raise UsageError(
            f"{option}: CUDA device {index} does not exist (this machine has {torch.cuda.device_count()}); "
            "use cuda:0 or auto"
        )


def check_device(device: str | int | None, option: str = "--device-map") -> None:
    """A device-map word (auto, balanced, cpu, …), ``cuda``/``cuda:N``/``N`` that exists here."""
    if device is None or isinstance(device, dict):
        return
    text = str(device).strip()
    if text in DEVICE_MAP_WORDS:
        if text == "mps":
            import torch

            if not torch.backends.mps.is_available():
                raise UsageError(f"{option} mps: this torch build has no MPS device; use cpu or auto")
        return
    match = re.fullmatch(r"(?:cuda(?::(\d+))?|(\d+))", text)
    if match is None:
        raise UsageError(
            f"{option} {text!r} is not a device; use {', '.join(DEVICE_MAP_WORDS)}, cuda or cuda:N"
        )
    _check_cuda_index(int(match[1] or match[2] or 0), option)


def parse_max_memory(spec: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=30GiB"`` → ``{0: "20GiB", "cpu": "30GiB"}`` (accelerate's format)."""
    if not spec:
        return None
    result: dict[int | str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise UsageError(f"--max-memory entries look like 0=20GiB,cpu=30GiB (got {part!r})")
        key = key.strip()
        result[int(key) if key.isdigit() else key] = value.strip()
    return result


def check_max_memory(spec: str | dict | None) -> None:
    """``0=20GiB,cpu=30GiB``: known devices, sizes accelerate understands."""
    if spec is None:
        return
    entries = parse_max_memory(spec) if isinstance(spec, str) else spec
    for key, value in (entries or {}).items():
        if isinstance(key, int) or str(key).isdigit():
            _check_cuda_index(int(key), "--max-memory")
        elif str(key) not in ("cpu", "disk", "mps"):
            raise UsageError(f"--max-memory: unknown device {key!r}; use GPU indices, cpu or disk")
        check_size(value, f"--max-memory {key}=")


def check_criterion_options(criterion: str, options: dict[str, Any] | None) -> None:
    """Before loading: refuse options the chosen criterion does not read (scoring would ignore them)."""
    if not options:
        return
    target = CRITERION_OPTIONS.get(criterion)
    if target is None:
        raise UsageError(f"criterion {criterion!r} takes no criterion options (got {', '.join(options)})")
    import dataclasses
    import importlib

    module, name = target.split(":")
    names = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown criterion option(s) {', '.join(unknown)} for {criterion!r}; "
                         f"it takes: {', '.join(sorted(names))}")


def max_positions(source: str) -> int | None:
    """``max_position_embeddings`` from a local folder's config.json (None when unknown or remote)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # loading reports the corrupt file
    value = data.get("max_position_embeddings") if isinstance(data, dict) else None
    return int(value) if isinstance(value, int) else None


def check_seq_len(seq_len: int | None, limit: int | None, option: str = "--seq-len") -> None:
    check_positive(seq_len, option, minimum=2)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise UsageError(f"{option} {seq_len} exceeds the model's {limit} positions; use {option} {limit}")


def check_loading(device_map: Any = None, max_memory: Any = None, seed: int | None = None,
                  max_shard_size: Any = None) -> None:
    """The loading/export options every model-loading command shares."""
    check_device(device_map)
    check_max_memory(max_memory)
    check_seed(seed)
    check_size(max_shard_size, "--max-shard-size")
