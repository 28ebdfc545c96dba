"""``minillm recover``: train a pruned export back (distillation from the dense model or next-token CE,
full-parameter or LoRA) and re-export it like ``prune`` does.

Runs as is on one device, or data-parallel with ``accelerate launch minillm recover …``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import typer
from rich.table import Table

from minillm.cli import console, friendly_errors
from minillm.commands import options


@friendly_errors
def recover(
    pruned: str = typer.Argument(..., help="Pruned export folder (or any local/Hub causal LM)."),
    data: str = typer.Option(
        ...,
        help="Training data: .txt, .jsonl/.json (text or Alpaca instruction/input/output) or a dataset name.",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the recovered (merged) export."),
    teacher: str = typer.Option(
        None, help="Dense teacher (default: the export's base model when it is a local folder or cached id)."
    ),
    loss: str = typer.Option("auto", help="kd, ce, kd+ce; auto = kd when a teacher is available, else ce."),
    temperature: float = typer.Option(1.0, help="Distillation temperature τ (Minitron: 1)."),
    mode: str = typer.Option(
        "logits", help="logits: train on the outputs; blocks: block-local reconstruction of the dense blocks."
    ),
    block_steps: int = typer.Option(200, help="--mode blocks: Adam steps per block."),
    block_samples: int = typer.Option(32, help="--mode blocks: calibration windows of --max-length tokens."),
    method: str = typer.Option("auto", help="full, lora; auto = full up to 1B parameters, else LoRA."),
    max_tokens: int = typer.Option(None, help="Training-token budget (sets the steps; overrides --epochs)."),
    cache_teacher: str = typer.Option(
        None, help="Folder for sampled teacher outputs: the teacher runs first, alone, then is released."
    ),
    teacher_samples: int = typer.Option(64, help="--cache-teacher: tokens sampled per position."),
    teacher_max_memory: str = typer.Option(
        None, help="Offload the teacher with accelerate, e.g. '0=10GiB,cpu=30GiB' (default: student device)."
    ),
    chunk_size: int = typer.Option(256, help="Tokens per LM-head chunk (the logits held at once)."),
    val_data: str = typer.Option(
        None, help="Validation data (default: hold out --val-size training examples)."
    ),
    rank: int = typer.Option(8, help="LoRA rank r."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    dropout: float = typer.Option(0.05, help="LoRA dropout."),
    target_modules: str = typer.Option(
        None, help="Comma-separated Linear names (default: every projection)."
    ),
    lr: float = typer.Option(None, help="Peak learning rate (AdamW, warm-up, decay); 1e-4 LoRA, 2e-5 full."),
    epochs: float = typer.Option(2.0, help="Passes over the training data."),
    max_steps: int = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(4, help="Examples per micro-batch (per device)."),
    grad_accum: int = typer.Option(16, help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(256, help="Tokens per example / text window."),
    warmup_steps: int = typer.Option(100, help="Warm-up steps (at most 10% of the run)."),
    val_size: int = typer.Option(128, help="Held-out examples for validation perplexity."),
    eval_every: int = typer.Option(50, help="Validation perplexity every N steps (0: only start and end)."),
    save_every: int = typer.Option(100, help="Checkpoint every N steps (0: never)."),
    max_examples: int = typer.Option(None, help="Use at most this many training examples."),
    train_on_inputs: bool = typer.Option(False, help="Alpaca data: also train on the prompt."),
    checkpoint_dir: str = typer.Option(None, help="Checkpoint folder (default: <out>.checkpoints)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in the checkpoint folder."),
    keep_checkpoints: bool = typer.Option(False, help="Keep the checkpoints after a successful export."),
    seed: int = typer.Option(0, help="Seed for the validation split, shuffling and LoRA init."),
    dtype: str = options.dtype(),
    overwrite: bool = typer.Option(False, help="Replace --out if it is a minillm export (or empty)."),
    force: bool = options.force(),
    trust_remote_code: bool = options.trust_remote_code(),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard."),
) -> None:
    """Recover a pruned model: distil from the dense model (or train on the text), full or LoRA; export."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from minillm.recover import RecoverConfig
    from minillm.recover import recover as recover_api

    config = RecoverConfig(
        mode=mode,
        block_steps=block_steps,
        block_samples=block_samples,
        method=method,
        loss=loss,
        temperature=temperature,
        chunk_size=chunk_size,
        teacher_samples=teacher_samples,
        max_tokens=max_tokens,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=[t.strip() for t in target_modules.split(",") if t.strip()]
        if target_modules
        else None,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        warmup_steps=warmup_steps,
        val_size=val_size,
        eval_every=eval_every,
        save_every=save_every,
        train_on_inputs=train_on_inputs,
        max_examples=max_examples,
        seed=seed,
    )
    bar = Progress(
        TextColumn("recover"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task: dict[str, Any] = {}

    def on_step(step: int, total: int, loss: float, rate: float) -> None:
        if "id" not in task:
            task["id"] = bar.add_task("recover", total=total, loss="-", lr="-")
        bar.update(task["id"], completed=step, total=total, loss=f"{loss:.4f}", lr=f"{rate:.2e}")

    with bar:
        result = recover_api(
            pruned,
            data,
            out,
            config,
            teacher=teacher,
            teacher_max_memory=teacher_max_memory,
            cache_teacher=cache_teacher,
            val_data=val_data,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            keep_checkpoints=keep_checkpoints,
            overwrite=overwrite,
            force=force,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            max_shard_size=max_shard_size,
            on_step=on_step,
            log=bar.console.print,
            command=shlex.join(["minillm", *sys.argv[1:]]),
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    log = result.log
    table = Table(title="minillm recover", show_header=False)
    recovery = result.metadata.get("recovery", {})
    teacher_name = f" from {recovery['teacher']}" if recovery.get("teacher") else ""
    table.add_row("method", f"{recovery.get('method')}, loss {recovery.get('loss')}{teacher_name}")
    table.add_row(
        "steps",
        f"{len(log.losses)} of {log.total_steps} ({log.steps_per_epoch} per epoch, "
        f"{log.train_examples} train / {log.val_examples} validation examples)",
    )
    if log.losses:
        table.add_row("train loss", f"{log.losses[0]:.4f} → {log.losses[-1]:.4f}")
    if log.val_ppl:
        table.add_row("validation perplexity", f"{log.val_ppl[0][1]:.3f} → {log.val_ppl[-1][1]:.3f}")
    table.add_row("training tokens", f"{log.tokens:,}")
    table.add_row("training time", f"{log.seconds:.1f} s")
    if result.out is not None:
        table.add_row("saved to", str(result.out))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("recover")(recover)
