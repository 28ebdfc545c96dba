"""The LSTM area's Python API: ``train``, ``prune`` and ``evaluate``; ``minillm lstm …`` calls these.

Each function reads a run top to bottom: load → (score → plan → surgery) → fine-tune → evaluate →
export. They return plain dataclasses the CLI turns into tables and the benchmark into Markdown, and
report progress through an optional ``progress(phase, done, total)`` callback.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minillm.calibration.spsa import SpsaConfig
from minillm.lstm.criteria import CRITERIA, ScoreContext
from minillm.lstm.criteria.group_lasso import regularizer as group_lasso_regularizer
from minillm.lstm.data import Corpus, batchify, bptt_windows, head
from minillm.lstm.dst import densify, dst_penalty, overall_density, sparsify, sparsity_report
from minillm.lstm.export import check_output_dir, load_model, save_model
from minillm.lstm.groups import unit_groups
from minillm.lstm.model import LstmLm, LstmLmConfig, count_parameters
from minillm.lstm.plan import PrunePlan, plan_from_scores
from minillm.lstm.speed import SpeedResult, inference_speed
from minillm.lstm.surgery import apply_plan, check_fused
from minillm.lstm.train import TrainConfig, evaluate_nll, perplexity, train_lm

Progress = Callable[[str, int, int], None]
FUSED_TOLERANCE = 1e-4


def _phase(progress: Progress | None, name: str) -> Callable[[int, int, float], None] | None:
    if progress is None:
        return None
    return lambda done, total, _value: progress(name, done, total)


def _ppl(model: LstmLm, ids: torch.Tensor, progress: Progress | None, name: str, **kw: Any) -> float:
    return perplexity(evaluate_nll(model, ids, on_step=_phase(progress, name), **kw))


@dataclass
class DstSettings:
    """DST during training: ``alpha`` weights Σexp(−t); ``kinds`` picks the layers to mask."""

    alpha: float = 1e-4
    kinds: tuple[str, ...] = ("linear", "lstm")


@dataclass
class TrainSummary:
    out_dir: Path | None
    config: LstmLmConfig
    parameters: int
    steps: int
    seconds: float
    valid_ppl: float
    test_ppl: float
    dst_density: float | None = None
    dst_layers: list[dict[str, Any]] = field(default_factory=list)


def train(
    data_dir: Path,
    out_dir: Path | None,
    model_config: dict[str, Any],
    train_config: TrainConfig,
    dst: DstSettings | None = None,
    group_lasso: float = 0.0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> TrainSummary:
    """Train a word-level LSTM LM from scratch (optionally with DST or group lasso) and save it."""
    if out_dir is not None:
        check_output_dir(out_dir, overwrite)
    corpus = Corpus.load(data_dir)
    config = LstmLmConfig(vocab_size=len(corpus.vocab), **model_config)
    model = LstmLm(config, torch.Generator().manual_seed(train_config.seed))
    result = train_model(model, corpus, train_config, dst=dst, group_lasso=group_lasso, progress=progress)
    if out_dir is not None:
        skip = ("out_dir", "config", "dst_layers")
        side: dict[str, Any] = {"metrics.json": {k: v for k, v in result.__dict__.items() if k not in skip}}
        if dst is not None:
            side["dst_report.json"] = {"alpha": dst.alpha, "density": result.dst_density,
                                       "layers": result.dst_layers}
        save_model(model, corpus.vocab, out_dir, side, overwrite=overwrite)
    result.out_dir = out_dir
    return result


def train_model(
    model: LstmLm,
    corpus: Corpus,
    train_config: TrainConfig,
    dst: DstSettings | None = None,
    group_lasso: float = 0.0,
    progress: Progress | None = None,
) -> TrainSummary:
    """In-memory training; a DST model is densified (masks baked in) before it is returned."""
    terms: list[Callable[[torch.nn.Module], torch.Tensor]] = []
    if dst is not None:
        # a masked tied decoder would also mask the embedding it shares its weight with
        skip = ("decoder",) if model.config.tie_weights else ()
        sparsify(model, kinds=dst.kinds, skip=skip)
        terms.append(lambda m: dst.alpha * dst_penalty(m))
    if group_lasso > 0:
        if dst is not None:
            raise ValueError("combine DST and group lasso in separate runs")
        terms.append(group_lasso_regularizer(unit_groups(model.config), group_lasso))
    extra = (lambda m: sum(t(m) for t in terms)) if terms else None  # type: ignore[return-value, misc]
    result = train_lm(model, corpus.train, train_config, extra_loss=extra, on_step=_phase(progress, "train"))
    density, layers = None, []
    if dst is not None:
        report = sparsity_report(model)
        density = overall_density(report)
        layers = [dict(r.__dict__, density=r.density) for r in report]
        densify(model)
    return TrainSummary(
        out_dir=None,
        config=model.config,
        parameters=count_parameters(model),
        steps=result.steps,
        seconds=result.seconds,
        valid_ppl=_ppl(model, corpus.valid, progress, "valid"),
        test_ppl=_ppl(model, corpus.test, progress, "test"),
        dst_density=density,
        dst_layers=layers,
    )


@dataclass
class PruneSettings:
    """How to prune: criterion, uniform keep ratio, calibration, criterion knobs, fine-tune."""

    criterion: str = "magnitude"
    keep_ratio: float = 0.5
    calib_windows: int = 8
    calib_batch_size: int = 16
    bptt: int = 35
    spsa: SpsaConfig = field(default_factory=lambda: SpsaConfig(steps=32, eps=1e-3, seed=0))
    group_lasso: float = 5e-3
    group_lasso_steps: int = 200
    finetune: TrainConfig | None = None
    seed: int = 0


@dataclass
class PruneSummary:
    out_dir: Path | None
    plan: PrunePlan
    parameters_before: int
    parameters_after: int
    valid_ppl_before: float | None = None
    valid_ppl_pruned: float | None = None
    valid_ppl_finetuned: float | None = None
    test_ppl: float | None = None
    fused_max_error: float | None = None
    speed_before: SpeedResult | None = None
    speed_after: SpeedResult | None = None


def calibration_windows(corpus: Corpus, settings: PruneSettings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``calib_windows`` BPTT windows of the training split (never valid or test)."""
    return head(bptt_windows(batchify(corpus.train, settings.calib_batch_size), settings.bptt),
                settings.calib_windows)


def score_units(
    model: LstmLm, corpus: Corpus, settings: PruneSettings, progress: Progress | None = None
) -> list[torch.Tensor]:
    """Per-layer hidden-unit scores from the chosen criterion (group lasso trains ``model`` in place)."""
    criterion = CRITERIA.get(settings.criterion)
    regularize = None
    if settings.group_lasso_steps > 0:
        base = settings.finetune or TrainConfig()
        regularize = TrainConfig(**{**base.__dict__, "max_steps": settings.group_lasso_steps})
    ctx = ScoreContext(
        calib=calibration_windows(corpus, settings),
        train_ids=corpus.train,
        regularize=regularize,
        group_lasso=settings.group_lasso,
        spsa=settings.spsa,
        seed=settings.seed,
        on_step=_phase(progress, f"score:{settings.criterion}"),
    )
    return criterion(model, ctx)


def prune_model(
    model: LstmLm, corpus: Corpus, settings: PruneSettings, progress: Progress | None = None
) -> tuple[LstmLm, PrunePlan, float]:
    """Score, plan and cut (no fine-tune): the smaller model, its plan, the fused-kernel check error."""
    work = copy.deepcopy(model)
    scores = score_units(work, corpus, settings, progress)
    plan = plan_from_scores(scores, settings.keep_ratio, settings.criterion,
                            meta={"keep_ratio": settings.keep_ratio})
    pruned = apply_plan(work, plan)
    generator = torch.Generator().manual_seed(settings.seed)
    error = max(err for rnn in pruned.rnns for err in check_fused(rnn, generator=generator).values())
    if error > FUSED_TOLERANCE:
        raise RuntimeError(f"fused LSTM disagrees with the reference cell after surgery (|Δ| = {error:.1e})")
    return pruned, plan, error


def prune(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path | None,
    settings: PruneSettings,
    dry_run: bool = False,
    speed: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PruneSummary:
    """Load a saved LM, remove hidden units by ``settings``, fine-tune, evaluate and save (unless dry run)."""
    if out_dir is not None and not dry_run:
        check_output_dir(out_dir, overwrite)
    loaded = load_model(model_dir)
    corpus = Corpus.load(data_dir, loaded.vocab)
    model = loaded.model
    summary = PruneSummary(
        out_dir=None,
        plan=PrunePlan(model.config.hidden_sizes, tuple(tuple(range(h)) for h in model.config.hidden_sizes)),
        parameters_before=count_parameters(model),
        parameters_after=count_parameters(model),
    )
    pruned, summary.plan, summary.fused_max_error = prune_model(model, corpus, settings, progress)
    summary.parameters_after = count_parameters(pruned)
    if dry_run:
        return summary
    summary.valid_ppl_before = _ppl(model, corpus.valid, progress, "valid (before)")
    summary.valid_ppl_pruned = _ppl(pruned, corpus.valid, progress, "valid (pruned)")
    if settings.finetune is not None:
        train_lm(pruned, corpus.train, settings.finetune, on_step=_phase(progress, "fine-tune"))
        summary.valid_ppl_finetuned = _ppl(pruned, corpus.valid, progress, "valid (fine-tuned)")
    summary.test_ppl = _ppl(pruned, corpus.test, progress, "test")
    if speed:
        summary.speed_before = inference_speed(model)
        summary.speed_after = inference_speed(pruned)
    if out_dir is not None:
        metrics = {k: v for k, v in summary.__dict__.items()
                   if k not in ("out_dir", "plan", "speed_before", "speed_after")}
        side = {"prune_plan.json": summary.plan.to_dict(), "metrics.json": metrics}
        save_model(pruned, loaded.vocab, out_dir, side, overwrite=overwrite)
        summary.out_dir = out_dir
    return summary


@dataclass
class EvalSummary:
    config: LstmLmConfig
    parameters: int
    split: str
    tokens: int
    ppl: float
    speed: SpeedResult | None = None
    side_files: dict[str, Any] = field(default_factory=dict)


def evaluate(
    model_dir: Path,
    data_dir: Path,
    split: str = "test",
    batch_size: int = 10,
    bptt: int = 35,
    speed: bool = False,
    progress: Progress | None = None,
) -> EvalSummary:
    """Perplexity of a saved LM on one split of a corpus (with the model's own vocabulary)."""
    loaded = load_model(model_dir)
    corpus = Corpus.load(data_dir, loaded.vocab)
    ids = corpus.split(split)
    ppl = _ppl(loaded.model, ids, progress, split, batch_size=batch_size, bptt=bptt)
    return EvalSummary(
        config=loaded.model.config,
        parameters=count_parameters(loaded.model),
        split=split,
        tokens=int(ids.numel()),
        ppl=ppl,
        speed=inference_speed(loaded.model) if speed else None,
        side_files=loaded.side_files,
    )
