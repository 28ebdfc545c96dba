"""The CNN pruner's Python API: ``train_cnn``, ``prune_cnn``, ``evaluate_cnn`` (the CLI calls these).

A prune run, top to bottom (:func:`prune_model` is the in-memory core the benchmark also uses):

    load export → trace coupled channel groups (Torch-Pruning) → cost model (FLOPs/params)
    → criterion.calibrate(batches) → one score per channel → global plan under the target
    → physical surgery → (fine-tune) → export (safetensors + spec + plan)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.vision.criteria import CRITERIA
from minillm.vision.criteria.base import ScoringContext
from minillm.vision.data import ImageData, load_data
from minillm.vision.export import load_model, save_model
from minillm.vision.flops import CostModel, count_flops, count_params
from minillm.vision.groups import build_graph, channel_groups
from minillm.vision.models import build_model, default_spec
from minillm.vision.plan import PrunePlan, global_plan
from minillm.vision.surgery import apply_plan
from minillm.vision.train import Progress, TrainConfig, evaluate, recalibrate_bn, train


@dataclass
class PruneSettings:
    """criterion: registry name; exactly one of flops_ratio / params_ratio (fraction to *remove*);
    calib_batches x calib_batch_size training images feed data-driven criteria; weight_decay: λ for
    IFSO (None: the value the model was trained with); bn_recalib_images: re-estimate BN statistics on
    this many training images after the cut (forward only); criterion_options: extra keyword arguments."""

    criterion: str = "ifso"
    flops_ratio: float | None = None
    params_ratio: float | None = None
    calib_batches: int = 8
    calib_batch_size: int = 64
    seed: int = 0
    weight_decay: float | None = None
    cost_norm: str = "none"
    allocation: str = "global"
    max_group_ratio: float = 0.9
    bn_recalib_images: int = 0
    criterion_options: dict[str, Any] = field(default_factory=dict)

    def target(self) -> tuple[str, float]:
        if (self.flops_ratio is None) == (self.params_ratio is None):
            raise ValueError("give exactly one of flops_ratio (--flops-ratio) or params_ratio (--ratio)")
        kind, ratio = (
            ("flops", self.flops_ratio) if self.flops_ratio is not None else ("params", self.params_ratio)
        )
        assert ratio is not None
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"the fraction of {kind} to remove must be in (0, 1), got {ratio}")
        return kind, ratio


def model_stats(model: nn.Module, data: ImageData) -> dict[str, float]:
    stats = evaluate(model, data.test_x, data.test_y)
    stats["params"] = count_params(model)
    stats["flops"] = count_flops(model, data.test_x[:1])
    return stats


def calibration_batches(
    data: ImageData, n: int, size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` disjoint seeded batches from the training split."""
    perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
    n = min(n, len(perm) // size) if len(perm) >= size else 1
    return [
        (data.train_x[perm[i * size : (i + 1) * size]], data.train_y[perm[i * size : (i + 1) * size]])
        for i in range(n)
    ]


def score_channels(
    model: nn.Module, data: ImageData, s: PruneSettings, weight_decay: float
) -> tuple[dict[str, torch.Tensor], list, CostModel]:
    """Trace groups, calibrate the criterion, and return ``({group: scores}, groups, cost model)``."""
    example = data.train_x[:1]
    graph = build_graph(model, example)
    groups = channel_groups(model, graph)
    cost = CostModel(model, groups, example)
    criterion = CRITERIA.get(s.criterion)(**s.criterion_options)
    ctx = ScoringContext(
        model=model,
        groups=groups,
        batches=calibration_batches(data, s.calib_batches, s.calib_batch_size, s.seed)
        if getattr(criterion, "needs_data", True)
        else [],
        weight_decay=weight_decay,
        generator=torch.Generator().manual_seed(s.seed),
    )
    criterion.calibrate(ctx)
    scores = {g.name: criterion(g.tp_group) for g in groups}
    return scores, groups, cost


def prune_model(
    model: nn.Module, data: ImageData, s: PruneSettings, weight_decay: float
) -> tuple[nn.Module, PrunePlan, float]:
    """Score, plan and cut; returns ``(pruned copy, plan, seconds spent scoring)``."""
    kind, ratio = s.target()
    t0 = time.perf_counter()
    scores, groups, cost = score_channels(model, data, s, weight_decay)
    seconds = time.perf_counter() - t0
    plan = global_plan(
        scores, groups, cost, ratio, kind, s.max_group_ratio, s.cost_norm, s.criterion, s.allocation
    )
    plan.meta["criterion_options"] = dict(s.criterion_options)
    plan.meta["seed"] = s.seed
    return apply_plan(model, plan, data.train_x[:1]), plan, seconds


def train_cnn(
    arch: str,
    data_spec: str,
    out_dir: str | Path,
    cfg: TrainConfig,
    image_size: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a named architecture from scratch and export it."""
    if image_size is None and arch.startswith("vgg") and data_spec.startswith("mnist5k"):
        image_size = 32  # five 2x2 pools need 32px
    data = load_data(data_spec, image_size, seed=0)
    model = build_model(default_spec(arch, data.in_channels, data.num_classes), seed=cfg.seed)
    history = train(model, data, cfg, progress)
    stats = model_stats(model, data)
    meta = {
        "data": data_spec,
        "image_size": data.image_size,
        "data_description": data.description,
        "train": asdict(cfg),
        "history": history,
        "metrics": stats,
    }
    save_model(model, out_dir, meta, name=arch)
    return {"metrics": stats, "history": history, "out_dir": str(out_dir), "data": data.description}


def _data_for(config: dict[str, Any], data_spec: str | None) -> ImageData:
    meta = config.get("meta", {})
    spec = data_spec or meta.get("data")
    if not spec:
        raise ValueError("this export does not record its data set; pass --data")
    return load_data(spec, meta.get("image_size"), seed=0)


def evaluate_cnn(model_dir: str | Path, data_spec: str | None = None) -> dict[str, Any]:
    model, config = load_model(model_dir)
    data = _data_for(config, data_spec)
    return {"metrics": model_stats(model, data), "spec": config["spec"], "data": data.description}


def prune_cnn(
    model_dir: str | Path,
    settings: PruneSettings,
    out_dir: str | Path | None = None,
    data_spec: str | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Prune an export; fine-tune and export unless ``dry_run`` (which only returns the plan)."""
    settings.target()  # validate before any work
    if out_dir is not None and not dry_run:
        from minillm.output_guard import check_no_overlap

        check_no_overlap(out_dir, (model_dir,))  # never replace the export being pruned
    model, config = load_model(model_dir)
    data = _data_for(config, data_spec)
    meta = config.get("meta", {})
    lam = settings.weight_decay
    if lam is None:
        lam = float(meta.get("train", {}).get("weight_decay", 5e-4))
    before = model_stats(model, data)
    pruned, plan, seconds = prune_model(model, data, settings, lam)
    result: dict[str, Any] = {
        "plan": plan,
        "before": before,
        "score_seconds": seconds,
        "data": data.description,
    }
    if dry_run:
        return result
    result["after"] = model_stats(pruned, data)
    if settings.bn_recalib_images > 0:
        perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(settings.seed))
        recalibrate_bn(pruned, data.train_x[perm[: settings.bn_recalib_images]])
        result["after_bn"] = model_stats(pruned, data)
    if finetune_epochs > 0:
        base = TrainConfig(**meta.get("train", {})) if meta.get("train") else TrainConfig()
        ft = TrainConfig(**{**asdict(base), "epochs": finetune_epochs, "lr": finetune_lr, "slim_l1": 0.0})
        train(pruned, data, ft, progress)
        result["finetuned"] = model_stats(pruned, data)
    if out_dir is not None:
        new_meta = {
            **{k: meta[k] for k in ("data", "image_size", "data_description", "train") if k in meta},
            "pruned_from": str(model_dir),
            "plan": plan.__dict__,
            "metrics_before": before,
            "metrics_after": result["after"],
            "metrics_after_bn_recalib": result.get("after_bn"),
            "metrics_finetuned": result.get("finetuned"),
            "finetune_epochs": finetune_epochs,
        }
        save_model(pruned, out_dir, new_meta, name=config["spec"].get("name"))
        result["out_dir"] = str(out_dir)
    return result
