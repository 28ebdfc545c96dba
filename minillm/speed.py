"""Inference speed of a causal LM and of its pruned versions: prefill and decode tokens/s, peak memory.

Why it is shaped like this: timings are only comparable when taken in one process under the same load,
so :func:`benchmark` takes several models and **interleaves** them (every repeat runs every case on
every model, alternating the model order) and reports medians; ratios to a reference model come from
those medians. Prefill = one forward over ``batch × prompt_len`` tokens that fills the KV cache and
keeps only the last position's logits, as generation does. Decode = ``new_tokens`` greedy steps of one
token per sequence on that cache (the prefill is not in the decode time). Peak memory is the extra
memory a case needs on top of the loaded weights: on CUDA ``max_memory_allocated`` over the case; on
CPU the process's peak RSS (``VmHWM``, reset before the case through ``/proc/self/clear_refs``) minus
its RSS before the case. Input ids come from a seeded generator.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from minillm.errors import UsageError


@dataclass(frozen=True)
class SpeedCase:
    batch_size: int
    prompt_len: int
    new_tokens: int


@dataclass
class SpeedRow:
    """Medians over the repeats of one (model, case)."""

    model: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    peak_extra_bytes: int | None
    params: int
    weight_bytes: int
    repeats: int
    prefill_all: list[float] = field(default_factory=list)
    decode_all: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_len / self.prefill_seconds

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / self.decode_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, e.g. 1,4 (got {text!r})") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} needs at least one positive integer (got {text!r})")
    return values


def cases(batch_sizes: list[int], prompt_lens: list[int], new_tokens: int) -> list[SpeedCase]:
    return [SpeedCase(b, n, new_tokens) for b in batch_sizes for n in prompt_lens]


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor) -> tuple[float, Any, torch.Tensor]:
    """Seconds for one cache-filling forward; returns the cache and the next (greedy) tokens too."""
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start, out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def decode(model: nn.Module, cache: Any, token: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy one-token steps on ``cache`` (all sequences advance together)."""
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - start


class PeakMemory:
    """Extra memory of one block over what was in use before it (CUDA allocator or CPU ``VmHWM``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra: int | None = None

    def __enter__(self) -> PeakMemory:
        from minillm.memory import reset_peak, rss_bytes

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._supported = reset_peak()
            self._base = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        from minillm.memory import peak_rss_bytes

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self._supported:
            self.extra = max(0, peak_rss_bytes() - self._base)


def benchmark(
    models: dict[str, nn.Module],
    speed_cases: list[SpeedCase],
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SpeedRow]:
    """Median prefill/decode times of every model on every case, measured interleaved in this process."""
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    vocab = min(int(m.config.vocab_size) for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    inputs = {c: torch.randint(vocab, (c.batch_size, c.prompt_len), generator=generator) for c in speed_cases}
    times: dict[tuple[str, SpeedCase], list[tuple[float, float]]] = {
        (n, c): [] for n in models for c in speed_cases
    }
    peaks: dict[tuple[str, SpeedCase], int | None] = {}
    names = list(models)
    total = (warmup + repeats) * len(speed_cases) * len(names)
    done = 0
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]  # alternate, so drift in the machine's load cancels
        for case in speed_cases:
            for name in order:
                model = models[name]
                ids = inputs[case].to(_device(model))
                with PeakMemory(_device(model)) as memory:
                    t_prefill, cache, token = prefill(model, ids)
                    t_decode = decode(model, cache, token, case.new_tokens)
                del cache
                if r >= warmup:
                    times[(name, case)].append((t_prefill, t_decode))
                    if (name, case) not in peaks:
                        peaks[(name, case)] = memory.extra
                done += 1
                if progress is not None:
                    progress("speed benchmark", done, total)
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for case in speed_cases:
            pre, dec = zip(*times[(name, case)], strict=True)
            rows.append(
                SpeedRow(
                    name,
                    case.batch_size,
                    case.prompt_len,
                    case.new_tokens,
                    statistics.median(pre),
                    statistics.median(dec),
                    peaks.get((name, case)),
                    params,
                    weight_bytes,
                    repeats,
                    list(pre),
                    list(dec),
                )
            )
    return rows


def ratios(rows: list[SpeedRow], reference: str) -> list[dict[str, Any]]:
    """Per non-reference row: latency ratios (model time / reference time) for prefill and decode."""
    base = {(r.batch_size, r.prompt_len, r.new_tokens): r for r in rows if r.model == reference}
    result = []
    for row in rows:
        ref = base.get((row.batch_size, row.prompt_len, row.new_tokens))
        if row.model == reference or ref is None:
            continue
        result.append(
            {
                "model": row.model,
                "batch_size": row.batch_size,
                "prompt_len": row.prompt_len,
                "new_tokens": row.new_tokens,
                "prefill_latency_ratio": row.prefill_seconds / ref.prefill_seconds,
                "decode_latency_ratio": row.decode_seconds / ref.decode_seconds,
                "params_ratio": row.params / ref.params,
            }
        )
    return result


def geometric_mean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(rows: list[SpeedRow], reference: str | None = None) -> str:
    """The table docs/benchmarks.md shows: tokens/s per case and, with a reference, latency ratios."""
    ratio = {
        (r["model"], r["batch_size"], r["prompt_len"]): r
        for r in (ratios(rows, reference) if reference else [])
    }
    head = ["model", "params", "batch", "prompt", "new", "prefill tok/s", "decode tok/s", "peak extra MiB"]
    if reference:
        head += ["prefill latency ×", "decode latency ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.0f}"
        cells = [
            r.model,
            f"{r.params / 1e6:.2f}M" if r.params >= 1e6 else f"{r.params:,}",
            str(r.batch_size),
            str(r.prompt_len),
            str(r.new_tokens),
            f"{r.prefill_tokens_per_s:,.0f}",
            f"{r.decode_tokens_per_s:,.1f}",
            peak,
        ]
        if reference:
            x = ratio.get((r.model, r.batch_size, r.prompt_len))
            cells += (
                ["1.00", "1.00"]
                if r.model == reference
                else (
                    [f"{x['prefill_latency_ratio']:.3f}", f"{x['decode_latency_ratio']:.3f}"]
                    if x
                    else ["-", "-"]
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
