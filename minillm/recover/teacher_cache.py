"""Teacher outputs cached on disk, so the teacher and the student never have to be in memory together.

What is stored per position is an unbiased sample of the teacher's distribution p (at temperature τ), not
its top-k: ``K`` tokens drawn with replacement from a proposal r ∝ p^α, each with its probability p(x)
and importance weight p(x) / (K · r(x)), plus the exact entropy H(p). Then −Σ_k w_k log q(x_k) − H(p) is
an unbiased estimate of KL(p ‖ q) for any student q, and its gradient of the student's logits is unbiased
too ("sparse logit sampling", Anshumann et al., 2025, https://arxiv.org/abs/2503.16870; Minitron found
that top-k ≤ 100 caches lose most of distillation's gain, and top-k is biased by construction).
α = 1 (the default) samples the teacher itself (all weights 1/K); α < 1 flattens the proposal to cover
the tail more often. K = 64 costs 64 × 12 bytes per token (ids int32, weights and probabilities float32).

Layout of a cache folder: ``meta.json`` (settings and a fingerprint of the training tokens) and
``shard-NNNNN.safetensors`` of :data:`SHARD_EXAMPLES` examples each, every example contributing one row
per position that predicts a next token. Written atomically; reused only when the fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.errors import UsageError
from minillm.recover.data import IGNORE, Example, collate
from minillm.recover.distill import execution_device, final_hidden, output_head

META_FILE = "meta.json"
SHARD_EXAMPLES = 1024
FORMAT = 1


def fingerprint(examples: list[Example], settings: dict[str, Any]) -> str:
    """Hash of the training tokens and the sampling settings: a cache is only valid for both."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for example in examples:
        digest.update(torch.tensor(example.input_ids, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def sample_rows(
    logits: torch.Tensor, samples: int, temperature: float, alpha: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """For each row of teacher logits: K sampled ids, their p and importance weights, and H(p)."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    proposal = p if alpha == 1.0 else torch.softmax(alpha * log_p, dim=-1)
    ids = torch.multinomial(proposal.cpu(), samples, replacement=True, generator=generator).to(p.device)
    picked_p, picked_r = p.gather(-1, ids), proposal.gather(-1, ids)
    return {
        "ids": ids.to(torch.int32).cpu(),
        "probs": picked_p.float().cpu(),
        "weights": (picked_p / (samples * picked_r)).float().cpu(),
        "entropy": entropy.float().cpu(),
    }


def build(
    teacher: nn.Module,
    examples: list[Example],
    folder: str | Path,
    settings: dict[str, Any],
    *,
    batch_size: int = 4,
    pad_id: int = 0,
    chunk: int = 256,
    log: Any = None,
) -> TeacherCache:
    """Run the teacher over ``examples`` once and write the sampled cache (or reuse a matching one).

    ``settings``: ``samples`` (K), ``temperature``, ``alpha`` (proposal r ∝ p^α), ``seed``, ``teacher``
    (its name, part of the fingerprint) and ``format``."""
    folder = Path(folder)
    samples, temperature, alpha = settings["samples"], settings["temperature"], settings["alpha"]
    key = fingerprint(examples, settings)
    if (folder / META_FILE).is_file():
        return TeacherCache(folder, examples, settings)  # checks the fingerprint
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"--cache-teacher {str(folder)!r} is not a teacher cache; give a new folder")
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(settings["seed"])
    head = output_head(teacher)
    device = execution_device(teacher.get_input_embeddings())
    from safetensors.torch import save_file

    for shard, first in enumerate(range(0, len(examples), SHARD_EXAMPLES)):
        parts: list[dict[str, torch.Tensor]] = []
        group = examples[first : first + SHARD_EXAMPLES]
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            tensors = collate(batch, pad_id)
            with torch.inference_mode():
                ids, mask = tensors["input_ids"].to(device), tensors["attention_mask"].to(device)
                hidden = final_hidden(teacher, ids, mask)
                for row, example in enumerate(batch):
                    positions = hidden[row, : len(example.input_ids) - 1]
                    for s in range(0, positions.shape[0], chunk):
                        parts.append(sample_rows(head(positions[s : s + chunk]), samples, temperature, alpha,
                                                 generator))
        lengths = torch.tensor([len(e.input_ids) - 1 for e in group])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        stacked = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
        save_file({**stacked, "offsets": offsets}, str(tmp / f"shard-{shard:05d}.safetensors"))
        if log is not None:
            log(f"teacher cache: {first + len(group)}/{len(examples)} examples")
    meta = {**settings, "fingerprint": key, "examples": len(examples)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    if folder.exists():
        folder.rmdir()
    tmp.rename(folder)
    return TeacherCache(folder, examples, settings)


class TeacherCache:
    """Reads a cache back, batch by batch, aligned with :func:`minillm.recover.distill.target_rows`."""

    def __init__(self, folder: str | Path, examples: list[Example], settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / META_FILE).read_text())
        if meta.get("fingerprint") != fingerprint(examples, settings):
            raise UsageError(
                f"--cache-teacher {str(self.folder)!r} was made for other training data or settings; "
                "give a new folder (or delete it)"
            )
        self.meta = meta
        self._open: dict[int, Any] = {}

    def _shard(self, number: int) -> Any:
        from safetensors import safe_open

        if number not in self._open:
            self._open[number] = safe_open(str(self.folder / f"shard-{number:05d}.safetensors"), "pt")
        return self._open[number]

    def rows(self, index: int) -> dict[str, torch.Tensor]:
        """Every cached row of example ``index`` (positions 0 … n−2)."""
        shard = self._shard(index // SHARD_EXAMPLES)
        offsets = shard.get_tensor("offsets")
        local = index % SHARD_EXAMPLES
        start, stop = int(offsets[local]), int(offsets[local + 1])
        return {name: shard.get_slice(name)[start:stop] for name in ("ids", "weights", "entropy")}

    def inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's ``sample_ids``, ``sample_weights``, ``entropy`` for TokenLoss: target rows only."""
        parts: dict[str, list[torch.Tensor]] = {"ids": [], "weights": [], "entropy": []}
        for row, index in enumerate(batch["index"].tolist()):
            cached = self.rows(index)
            length = cached["entropy"].shape[0]
            keep = (batch["labels"][row, 1 : length + 1] != IGNORE).cpu()
            for name in parts:
                parts[name].append(cached[name][keep])
        ids, weights, entropy = (torch.cat(parts[n]).to(device) for n in ("ids", "weights", "entropy"))
        return {"sample_ids": ids, "sample_weights": weights, "entropy": entropy}
