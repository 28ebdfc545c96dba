"""Recovery settings: one typed field per knob, defaults from LLM-Pruner's post-training recipe.

LLM-Pruner (Ma et al., 2023, https://arxiv.org/abs/2305.11627) recovers pruned LLaMA with LoRA
r=8, alpha=16, dropout 0.05 on every projection, lr 1e-4, 2 epochs, 256-token examples, 100 warm-up
steps and an effective batch of 64 (micro-batches of 4). Full-parameter training takes a smaller
default learning rate (2e-5: every weight moves, not a low-rank update). Distillation follows Minitron
(https://arxiv.org/abs/2408.11796): forward KL on logits at τ=1 and no cross-entropy term, their best loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from minillm.errors import UsageError

MODES = ("logits", "blocks")
METHODS = ("auto", "full", "lora")
DEFAULT_LR_BLOCKS = 1e-4
LOSS_CHOICES = ("auto", "kd", "ce", "kd+ce")
FULL_PARAMS_LIMIT = 1_000_000_000  # auto: full-parameter training up to 1B parameters (AdamW: ~16 B/param)
DEFAULT_LR_LORA = 1e-4
DEFAULT_LR_FULL = 2e-5


@dataclass
class RecoverConfig:
    """LoRA and training-loop settings of ``minillm recover``."""

    mode: str = field(
        default="logits",
        metadata={"help": "logits (train on the model's outputs) or blocks (block-local reconstruction)."},
    )
    block_steps: int = field(default=200, metadata={"help": "--mode blocks: Adam steps per block."})
    block_samples: int = field(
        default=32, metadata={"help": "--mode blocks: calibration windows of --max-length tokens."}
    )
    method: str = field(
        default="auto",
        metadata={"help": "full, lora, or auto (full for models up to FULL_PARAMS_LIMIT parameters)."},
    )
    loss: str = field(
        default="auto", metadata={"help": "kd, ce, kd+ce, or auto (kd when a teacher is available, else ce)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature τ."})
    chunk_size: int = field(
        default=256, metadata={"help": "Tokens per LM-head chunk (the logits held at once)."}
    )
    teacher_samples: int = field(
        default=64, metadata={"help": "Cached teacher: tokens sampled per position (--cache-teacher)."}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (update scaled by alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Linear names to adapt; None = every prunable projection (from the adapter)."},
    )
    lr: float | None = field(
        default=None,
        metadata={"help": "AdamW peak learning rate (warm-up, linear decay); None: 1e-4 LoRA, 2e-5 full."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights."})
    epochs: float = field(
        default=2.0, metadata={"help": "Passes over the training set (ignored with max_steps)."}
    )
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides epochs."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Training-token budget (sets the steps; overrides epochs)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Examples per micro-batch (per device)."})
    grad_accum: int = field(default=16, metadata={"help": "Micro-batches per optimizer step."})
    max_length: int = field(
        default=256, metadata={"help": "Tokens per example (text is cut into windows of it)."}
    )
    warmup_steps: int = field(
        default=100, metadata={"help": "Linear warm-up steps (capped at 10% of the run)."}
    )
    val_size: int = field(default=128, metadata={"help": "Held-out examples for validation perplexity."})
    eval_every: int = field(
        default=50, metadata={"help": "Validation perplexity every N optimizer steps (0: off)."}
    )
    save_every: int = field(default=100, metadata={"help": "Checkpoint every N optimizer steps (0: off)."})
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Alpaca data: also learn the prompt (else only the response)."}
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the split, shuffling and LoRA initialisation."})

    def __post_init__(self) -> None:
        checks = [
            (self.rank >= 1, f"--rank must be >= 1 (got {self.rank})"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1) (got {self.dropout})"),
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)} (got {self.mode})"),
            (min(self.block_steps, self.block_samples) >= 1, "--block-steps, --block-samples must be >= 1"),
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)} (got {self.method!r})"),
            (self.loss in LOSS_CHOICES, f"--loss must be one of {', '.join(LOSS_CHOICES)} (got {self.loss})"),
            (self.temperature > 0, f"--temperature must be positive (got {self.temperature})"),
            (min(self.chunk_size, self.teacher_samples) >= 1, "--chunk-size, --teacher-samples must be >= 1"),
            (self.lr is None or self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"--max-tokens must be >= 1 (got {self.max_tokens})",
            ),
            (self.max_tokens is None or self.max_steps is None, "give --max-tokens or --max-steps, not both"),
            (
                self.epochs > 0 or (self.max_steps or 0) > 0 or (self.max_tokens or 0) > 0,
                "give --epochs > 0, --max-steps > 0 or --max-tokens > 0",
            ),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"--max-steps must be >= 1 (got {self.max_steps})",
            ),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.max_length >= 8, f"--max-length must be >= 8 tokens (got {self.max_length})"),
            (
                self.val_size >= 0 and self.eval_every >= 0 and self.save_every >= 0,
                "--val-size, --eval-every and --save-every must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.mode == "blocks":
            return DEFAULT_LR_BLOCKS
        return DEFAULT_LR_FULL if self.method == "full" else DEFAULT_LR_LORA

    #: settings that must match for ``--resume`` to continue the same run
    RESUME_KEYS = (
        "mode",
        "method",
        "loss",
        "temperature",
        "max_tokens",
        "rank",
        "alpha",
        "target_modules",
        "lr",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "max_length",
        "val_size",
        "max_examples",
        "seed",
        "train_on_inputs",
    )
