"""The recovery training loop: accelerate for devices and gradient accumulation, one loop for every method.

Why accelerate: the same loop runs on one CPU, one GPU, or ``accelerate launch minillm recover …`` on
several GPUs (data parallel; only the main process writes checkpoints and the export). What it trains is
a :class:`~minillm.recover.distill.TokenLoss` (the student plus its loss), so full-parameter and LoRA
training, cross-entropy and distillation share it. Checkpoints hold only what training changes (the
trainable tensors as safetensors, optimizer and scheduler state, the position in the data), so
``--resume`` continues the exact run: same shuffling, same step.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.errors import UsageError
from minillm.recover.config import RecoverConfig
from minillm.recover.data import Example, collate
from minillm.recover.distill import (
    TokenLoss,
    ce_sum,
    chunked_head_loss,
    final_hidden,
    output_head,
    target_rows,
)

StepCallback = Callable[[int, int, float, float], None]  # step, total, loss, lr
LogCallback = Callable[[str], None]
ExtraInputs = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # batch -> teacher's part
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass
class TrainLog:
    """What the loop did: one mean loss per optimizer step, validation perplexities, wall time."""

    total_steps: int
    steps_per_epoch: int
    losses: list[float] = field(default_factory=list)
    val_ppl: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None
    train_examples: int = 0
    val_examples: int = 0
    tokens: int = 0
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)  # --mode blocks: errors per block

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "losses": self.losses,
            "val_ppl": self.val_ppl,
            "seconds": round(self.seconds, 2),
            "resumed_from": self.resumed_from,
            "train_examples": self.train_examples,
            "val_examples": self.val_examples,
            "tokens": self.tokens,
            **({"blocks": self.blocks} if self.blocks else {}),
        }


def _loader(examples: list[Example], config: RecoverConfig, pad_id: int, epoch: int | None) -> Any:
    """Examples in a seeded order per epoch (``epoch=None``: in order, for validation); each batch also
    carries ``index``, the examples' positions in ``examples`` (the teacher cache is keyed by it)."""
    from torch.utils.data import DataLoader

    order: list[int] = list(range(len(examples)))
    if epoch is not None:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()

    def collate_indexed(indices: list[int]) -> dict[str, torch.Tensor]:
        return {**collate([examples[i] for i in indices], pad_id), "index": torch.tensor(indices)}

    return DataLoader(order, batch_size=config.batch_size, shuffle=False, collate_fn=collate_indexed)  # type: ignore[arg-type]


def steps_for(config: RecoverConfig, train_set: list[Example], processes: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps): from --max-steps, --max-tokens or --epochs."""
    micro_per_epoch = math.ceil(len(train_set) / (config.batch_size * processes))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / config.grad_accum))
    if config.max_steps:
        return steps_per_epoch, config.max_steps
    if config.max_tokens:
        per_example = sum(len(e.input_ids) for e in train_set) / len(train_set)
        per_step = per_example * config.batch_size * config.grad_accum * processes
        return steps_per_epoch, max(1, math.ceil(config.max_tokens / per_step))
    return steps_per_epoch, max(1, math.ceil(config.epochs * steps_per_epoch))


def validation_perplexity(model: nn.Module, loader: Any, accelerator: Any, chunk: int) -> float:
    """exp(mean NLL) over every target token of the validation examples (summed across processes);
    the LM head is applied in chunks, as in training."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    head = output_head(model)
    with torch.no_grad():
        for batch in loader:
            hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
            rows, targets, _ = target_rows(hidden, batch["labels"])
            nll = chunked_head_loss(rows, lambda r, s, e, t=targets: ce_sum(head(r), t[s:e]), chunk, [])
            totals += torch.stack([nll.double(), torch.tensor(float(targets.numel()), device=totals.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return math.exp(float(totals[0] / totals[1])) if totals[1] > 0 else math.nan


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name (named_parameters lists a tied weight once)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(
    folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, state: dict[str, Any]
) -> None:
    """Write ``folder/step-N`` atomically (temp folder + rename) and drop older checkpoints."""
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"step-{state['step']:07d}"
        tmp = folder / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    return found[-1] if found else None


def _load_checkpoint(
    path: Path, model: nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, config: RecoverConfig
) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("config", {})
    changed = [k for k in RecoverConfig.RESUME_KEYS if saved.get(k) != config.to_dict().get(k)]
    if changed or not (path / WEIGHTS_FILE).is_file():
        raise UsageError(
            f"--resume: checkpoint {str(path)!r} was made with different {', '.join(changed) or 'version'}; "
            "use the same settings or drop --resume"
        )
    weights = load_file(str(path / WEIGHTS_FILE))
    params = dict(accelerator.unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return state


def train(
    model: nn.Module,
    train_set: list[Example],
    val_set: list[Example],
    config: RecoverConfig,
    pad_id: int,
    checkpoint_dir: Path | None,
    resume: bool = False,
    on_step: StepCallback | None = None,
    log: LogCallback | None = None,
    objective: TokenLoss | None = None,
    extra_inputs: ExtraInputs | None = None,
) -> tuple[nn.Module, TrainLog]:
    """Train the trainable tensors of ``model`` (full or peft) on ``objective`` (default: chunked CE);
    ``extra_inputs(batch)`` gives the teacher's part of each batch. Returns the unwrapped model."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum)
    if not accelerator.is_main_process:  # one progress bar and one log, however many processes
        on_step, log = None, None
    say = log or (lambda message: None)
    objective = objective or TokenLoss(model, "ce", chunk_size=config.chunk_size)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.peak_lr(), weight_decay=config.weight_decay)
    steps_per_epoch, total = steps_for(config, train_set, accelerator.num_processes)
    warmup = min(config.warmup_steps, total // 10)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, warmup * accelerator.num_processes, total * accelerator.num_processes
    )
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    student = accelerator.unwrap_model(objective).student
    val_loader = accelerator.prepare(_loader(val_set, config, pad_id, None)) if val_set else None
    record = TrainLog(total, steps_per_epoch, train_examples=len(train_set), val_examples=len(val_set))
    step, epoch, skip = 0, 0, 0
    if (resume or config.save_every) and checkpoint_dir is None:
        raise UsageError("checkpoints need a folder: give --out or --checkpoint-dir (or --save-every 0)")
    assert checkpoint_dir is not None or not (resume or config.save_every)
    if resume:
        assert checkpoint_dir is not None
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise UsageError(
                f"--resume: no checkpoint in {str(checkpoint_dir)!r}; run without --resume first"
            )
        state = _load_checkpoint(found, student, optimizer, scheduler, accelerator, config)
        step, epoch, skip = state["step"], state["epoch"], state["micro_in_epoch"]
        record.losses, record.val_ppl = state["losses"], [tuple(v) for v in state["val_ppl"]]  # type: ignore[misc]
        record.tokens = state.get("tokens", 0)
        record.resumed_from = step
        say(f"resumed from {found} (step {step}/{total})")
    start = time.perf_counter()

    def evaluate() -> None:
        assert val_loader is not None
        ppl = validation_perplexity(student, val_loader, accelerator, config.chunk_size)
        record.val_ppl.append((step, ppl))
        say(f"step {step}: validation perplexity {record.val_ppl[-1][1]:.3f}")

    if val_loader is not None and not record.val_ppl:
        evaluate()
    objective.train()
    window: list[float] = []
    while step < total:
        loader = accelerator.prepare(_loader(train_set, config, pad_id, epoch))
        micro = skip
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            extra = extra_inputs(batch) if extra_inputs is not None else {}
            with accelerator.accumulate(objective):
                loss = objective(batch["input_ids"], batch["attention_mask"], batch["labels"], **extra)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            record.tokens += int(accelerator.reduce(batch["attention_mask"].sum(), reduction="sum"))
            window.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
            if not accelerator.sync_gradients:
                continue
            step += 1
            record.losses.append(sum(window) / len(window))
            window = []
            if on_step is not None:
                on_step(step, total, record.losses[-1], scheduler.get_last_lr()[0])
            due = config.eval_every and (step % config.eval_every == 0 or step == total)
            if val_loader is not None and due:
                evaluate()
            if config.save_every and step % config.save_every == 0 and step < total:
                done_epoch = micro >= len(loader)
                state = {
                    "step": step,
                    "epoch": epoch + 1 if done_epoch else epoch,
                    "micro_in_epoch": 0 if done_epoch else micro,
                    "losses": record.losses,
                    "val_ppl": record.val_ppl,
                    "tokens": record.tokens,
                    "config": config.to_dict(),
                }
                assert checkpoint_dir is not None
                _save_checkpoint(checkpoint_dir, student, optimizer, scheduler, accelerator, state)
                say(f"step {step}: checkpoint saved to {checkpoint_dir}")
            if step >= total:
                break
        epoch += 1
    if val_loader is not None and (not record.val_ppl or record.val_ppl[-1][0] != step):
        evaluate()
    record.seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    objective.eval()
    accelerator.free_memory()
    return student, record
