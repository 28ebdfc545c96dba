"""The LoRA training loop: accelerate for devices and gradient accumulation, peft for the adapters.

Why accelerate: the same loop runs on one CPU, one GPU, or ``accelerate launch minillm recover …`` on
several GPUs (data parallel; only the main process writes checkpoints and the export). Checkpoints hold
only what training changes (the LoRA weights as safetensors, optimizer and scheduler state, the position
in the data), so they are small and ``--resume`` continues the exact run: same shuffling, same step.
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

from minillm.arch.base import ArchAdapter
from minillm.errors import UsageError
from minillm.recover.config import RecoverConfig
from minillm.recover.data import IGNORE, Example, collate

StepCallback = Callable[[int, int, float, float], None]  # step, total, loss, lr
LogCallback = Callable[[str], None]
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UsageError("minillm recover needs peft: pip install 'minillm-prune[recover]'") from None
    return peft


def lora_targets(model: nn.Module, adapter: ArchAdapter) -> list[str]:
    """Names (last component) of every prunable projection, read from the adapter, in layer order."""
    names = {module: name.rpartition(".")[2] for name, module in model.named_modules()}
    targets: list[str] = []
    for layer in adapter.decoder_layers(model):
        for linear in adapter.prunable_linears(layer):
            if names[linear] not in targets:
                targets.append(names[linear])
    return targets


def attach_lora(model: nn.Module, adapter: ArchAdapter, config: RecoverConfig) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; LoRA A is initialised from an explicit seeded generator."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules or lora_targets(model, adapter)
    available = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in available]
    if missing:
        raise UsageError(
            f"--target-modules {', '.join(missing)} not found; this model's Linear layers are "
            f"{', '.join(sorted(available))}"
        )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:  # peft's default init for A, but from our generator
                weight = torch.empty(param.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                param.copy_(weight)
    return peft_model


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
        }


def _loader(examples: list[Example], config: RecoverConfig, pad_id: int, epoch: int | None) -> Any:
    """Examples in a seeded order per epoch (``epoch=None``: in order, for validation)."""
    from torch.utils.data import DataLoader, Subset

    order: list[int] = list(range(len(examples)))
    if epoch is not None:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
    return DataLoader(
        Subset(examples, order),
        batch_size=config.batch_size,
        shuffle=False,  # type: ignore[arg-type]
        collate_fn=lambda batch: collate(batch, pad_id),
    )


def validation_perplexity(model: nn.Module, loader: Any, accelerator: Any) -> float:
    """exp(mean NLL) over every target token of the validation examples (summed across processes)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
            labels = batch["labels"][:, 1:]
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            totals += torch.stack([nll.double(), (labels != IGNORE).sum().double()])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return math.exp(float(totals[0] / totals[1])) if totals[1] > 0 else math.nan


def _save_checkpoint(
    folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, state: dict[str, Any]
) -> None:
    """Write ``folder/step-N`` atomically (temp folder + rename) and drop older checkpoints."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"step-{state['step']:07d}"
        tmp = folder / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = get_peft_model_state_dict(accelerator.unwrap_model(model))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / ADAPTER_FILE))
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
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("config", {})
    changed = [k for k in RecoverConfig.RESUME_KEYS if saved.get(k) != config.to_dict().get(k)]
    if changed:
        raise UsageError(
            f"--resume: checkpoint {str(path)!r} was made with different {', '.join(changed)}; "
            "use the same settings or drop --resume"
        )
    set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(str(path / ADAPTER_FILE)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return state


def train(
    model: nn.Module,
    train_set: list[Example],
    val_set: list[Example],
    config: RecoverConfig,
    pad_id: int,
    checkpoint_dir: Path,
    resume: bool = False,
    on_step: StepCallback | None = None,
    log: LogCallback | None = None,
) -> tuple[nn.Module, TrainLog]:
    """Train the LoRA weights of ``model`` (a peft model); returns the unwrapped model and the log."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum)
    if not accelerator.is_main_process:  # one progress bar and one log, however many processes
        on_step, log = None, None
    say = log or (lambda message: None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    micro_per_epoch = math.ceil(len(train_set) / (config.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / config.grad_accum))
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = min(config.warmup_steps, total // 10)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, warmup * accelerator.num_processes, total * accelerator.num_processes
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    val_loader = accelerator.prepare(_loader(val_set, config, pad_id, None)) if val_set else None
    record = TrainLog(total, steps_per_epoch, train_examples=len(train_set), val_examples=len(val_set))
    step, epoch, skip = 0, 0, 0
    if resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise UsageError(
                f"--resume: no checkpoint in {str(checkpoint_dir)!r}; run without --resume first"
            )
        state = _load_checkpoint(found, model, optimizer, scheduler, accelerator, config)
        step, epoch, skip = state["step"], state["epoch"], state["micro_in_epoch"]
        record.losses, record.val_ppl = state["losses"], [tuple(v) for v in state["val_ppl"]]  # type: ignore[misc]
        record.resumed_from = step
        say(f"resumed from {found} (step {step}/{total})")
    start = time.perf_counter()
    if val_loader is not None and not record.val_ppl:
        record.val_ppl.append((0, validation_perplexity(model, val_loader, accelerator)))
        say(f"step 0: validation perplexity {record.val_ppl[-1][1]:.3f}")
    model.train()
    window: list[float] = []
    while step < total:
        loader = accelerator.prepare(_loader(train_set, config, pad_id, epoch))
        micro = skip
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            window.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
            if not accelerator.sync_gradients:
                continue
            step += 1
            record.losses.append(sum(window) / len(window))
            window = []
            if on_step is not None:
                on_step(step, total, record.losses[-1], scheduler.get_last_lr()[0])
            if (
                val_loader is not None
                and config.eval_every
                and (step % config.eval_every == 0 or step == total)
            ):
                record.val_ppl.append((step, validation_perplexity(model, val_loader, accelerator)))
                say(f"step {step}: validation perplexity {record.val_ppl[-1][1]:.3f}")
            if config.save_every and step % config.save_every == 0 and step < total:
                done_epoch = micro >= len(loader)
                state = {
                    "step": step,
                    "epoch": epoch + 1 if done_epoch else epoch,
                    "micro_in_epoch": 0 if done_epoch else micro,
                    "losses": record.losses,
                    "val_ppl": record.val_ppl,
                    "config": config.to_dict(),
                }
                _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, accelerator, state)
                say(f"step {step}: checkpoint saved to {checkpoint_dir}")
            if step >= total:
                break
        epoch += 1
    if val_loader is not None and (not record.val_ppl or record.val_ppl[-1][0] != step):
        record.val_ppl.append((step, validation_perplexity(model, val_loader, accelerator)))
        say(f"step {step}: validation perplexity {record.val_ppl[-1][1]:.3f}")
    record.seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return unwrapped, record
