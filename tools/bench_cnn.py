"""Benchmark: CNN channel criteria (IFSO, l1, bn-scale, taylor, random) on the bundled MNIST subset.

Trains a ResNet-20 (cached under --work), scores every channel once per criterion, and for each FLOPs
target removes the globally lowest-scoring channels (Torch-Pruning surgery), then measures test accuracy
(1) as cut, (2) after re-estimating BN statistics on 1,024 training images (forward passes only, no
weight update), and (3) after a short fine-tune. Also runs IFSO variants (exact Hessian-vector products,
the H_mm term, sqrt-FLOPs normalisation) without fine-tuning, and rank correlations between scores.

Data: ``../shared/data/images/mnist_5k.csv.gz``, seeded 4,000 train / 1,000 test split, 28x28.

CPU-sized run (about 13 CPU-minutes on one core: 4 to train, 9 for the rest; what docs/benchmarks.md
reports):

    nice -n 5 python tools/bench_cnn.py --threads 1

Quick smoke run (a couple of minutes):

    python tools/bench_cnn.py --epochs 1 --ratios 0.5 --random-seeds 1 --work runs/cnn_smoke \
        --plot /tmp/cnn_smoke.png --table /tmp/cnn_smoke.md
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minillm.vision.api import PruneSettings, calibration_batches, model_stats, score_channels
from minillm.vision.data import load_data
from minillm.vision.export import load_model, save_model
from minillm.vision.models import build_model, default_spec
from minillm.vision.plan import global_plan
from minillm.vision.surgery import apply_plan
from minillm.vision.train import TrainConfig, recalibrate_bn, train


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def dense_model(args, data):
    path = Path(args.work) / "dense"
    if path.exists() and not args.retrain:
        model, config = load_model(path)
        return model, config["meta"]
    cfg = TrainConfig(epochs=args.epochs, lr=0.1, weight_decay=args.weight_decay, seed=0)
    model = build_model(default_spec(args.arch, data.in_channels, data.num_classes), seed=0)
    t0 = time.process_time()
    history = train(model, data, cfg)
    meta = {
        "train": asdict(cfg),
        "history": history,
        "train_cpu_s": time.process_time() - t0,
        "data": "mnist5k",
        "image_size": data.image_size,
    }
    save_model(model, path, meta, name=args.arch)
    return model, meta


def evaluate_plan(model, data, scores, groups, cost, ratio, args, name, allocation, cost_norm, finetune):
    plan = global_plan(scores, groups, cost, ratio, "flops", cost_norm=cost_norm, allocation=allocation)
    pruned = apply_plan(model, plan, data.train_x[:1])
    row = {"criterion": name, "target": ratio, "removed": plan.achieved_ratio}
    row["acc_cut"] = model_stats(pruned, data)["accuracy"]
    recal = copy.deepcopy(pruned)
    perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))
    recalibrate_bn(recal, data.train_x[perm[:1024]])
    row["acc_bn"] = model_stats(recal, data)["accuracy"]
    if finetune:
        ft = TrainConfig(epochs=args.finetune_epochs, lr=0.01, weight_decay=args.weight_decay, seed=0)
        train(pruned, data, ft)
        row["acc_ft"] = model_stats(pruned, data)["accuracy"]
    stats = model_stats(pruned, data)
    row["params"], row["flops"] = stats["params"], stats["flops"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--criteria", nargs="+", default=["ifso", "taylor", "l1", "bn-scale", "random"])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--calib-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/cnn_bench")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--plot", default="docs/img/cnn_accuracy_vs_flops.png")
    ap.add_argument("--table", default="docs/img/cnn_bench.md")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the table's JSON")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.table).with_suffix(".json").read_text())
        plot(args, saved["dense"], saved["rows"])
        return
    torch.set_num_threads(args.threads)
    cpu0 = time.process_time()

    data = load_data("mnist5k", 28, seed=0)
    model, meta = dense_model(args, data)
    dense = model_stats(model, data)
    print(
        f"dense {args.arch}: acc {dense['accuracy']:.4f}, {dense['params']} params, {dense['flops']} FLOPs",
        flush=True,
    )

    # 1) score every channel once per criterion (scores do not depend on the target)
    scorers: dict[str, PruneSettings] = {}
    for crit in args.criteria:
        for seed in range(args.random_seeds) if crit == "random" else [0]:
            scorers[crit if crit != "random" else f"random (seed {seed})"] = PruneSettings(crit, seed=seed)
    if "ifso" in args.criteria:
        scorers["ifso (exact HVP)"] = PruneSettings("ifso", criterion_options={"hvp": "exact"})
        scorers["ifso (+H_mm)"] = PruneSettings("ifso", criterion_options={"include_hmm": True})
    all_scores, score_time, scored = {}, {}, {}
    for label, settings in scorers.items():
        settings.calib_batches, settings.calib_batch_size = args.calib_batches, args.calib_batch_size
        t0 = time.process_time()
        scored[label] = score_channels(model, data, settings, args.weight_decay)
        score_time[label] = time.process_time() - t0
        all_scores[label] = torch.cat([scored[label][0][g.name] for g in scored[label][1]])

    # 2) plans: (row label, scores, allocation, cost_norm, fine-tune?)
    variants = [(label, label, "global", "none", True) for label in scorers if not label.startswith("ifso (")]
    variants += [(label, label, "global", "none", False) for label in scorers if label.startswith("ifso (")]
    if "ifso" in scorers:
        variants.append(("ifso (sqrt-flops)", "ifso", "global", "sqrt-flops", False))
    variants += [
        (f"{label} [uniform]", label, "uniform", "none", False)
        for label in scorers
        if not label.startswith("ifso (")
    ]
    rows = []
    for label, key, allocation, cost_norm, finetune in variants:
        scores, groups, cost = scored[key]
        for ratio in args.ratios:
            row = evaluate_plan(
                model, data, scores, groups, cost, ratio, args, label, allocation, cost_norm, finetune
            )
            row["score_cpu_s"] = score_time[key]
            rows.append(row)
            print(json.dumps(row), flush=True)

    corr = {}
    for a, b in [
        ("ifso", "ifso (exact HVP)"),
        ("ifso", "ifso (+H_mm)"),
        ("ifso", "taylor"),
        ("ifso", "l1"),
        ("taylor", "l1"),
        ("ifso", "bn-scale"),
    ]:
        if a in all_scores and b in all_scores:
            corr[f"{a} vs {b}"] = spearman(all_scores[a], all_scores[b])
    total_cpu = time.process_time() - cpu0
    write_outputs(
        args,
        dense,
        meta,
        rows,
        corr,
        total_cpu,
        len(calibration_batches(data, args.calib_batches, args.calib_batch_size, 0)),
    )


def write_outputs(args, dense, meta, rows, corr, total_cpu, n_batches) -> None:
    lines = [
        f"Dense {args.arch}: test accuracy {dense['accuracy']:.2%}, {dense['params'] / 1e3:.1f}k params, "
        f"{dense['flops'] / 1e6:.2f}M FLOPs (MACs, 28x28); trained {meta['train']['epochs']} epochs "
        f"({meta.get('train_cpu_s', float('nan')) / 60:.1f} CPU-min). Calibration: {n_batches} x "
        f"{args.calib_batch_size} training images. Benchmark CPU time: {total_cpu / 60:.1f} min.",
        "",
        "| criterion | FLOPs removed | params | acc. as cut | acc. + BN recalib. | acc. + fine-tune "
        f"{args.finetune_epochs} ep | scoring CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ft = f"{r['acc_ft']:.2%}" if "acc_ft" in r else "–"
        lines.append(
            f"| {r['criterion']} | {r['removed']:.1%} | {r['params'] / 1e3:.1f}k | {r['acc_cut']:.2%} | "
            f"{r['acc_bn']:.2%} | {ft} | {r['score_cpu_s']:.1f} |"
        )
    lines += ["", "Spearman rank correlation of channel scores (all channels of all groups):", ""]
    lines += [f"- {k}: {v:+.3f}" for k, v in corr.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(text)
    Path(args.table).with_suffix(".json").write_text(
        json.dumps({"dense": dense, "rows": rows, "spearman": corr, "cpu_s": total_cpu}, indent=2)
    )
    plot(args, dense, rows)


COLORS = {
    "ifso": "tab:blue",
    "taylor": "tab:orange",
    "l1": "tab:green",
    "bn-scale": "tab:red",
    "random": "tab:purple",
    "ifso (exact HVP)": "tab:brown",
    "ifso (+H_mm)": "tab:pink",
    "ifso (sqrt-flops)": "tab:gray",
}


def _series(label: str) -> tuple[str, bool]:
    """Row label -> (criterion or IFSO variant with any random seed dropped, uniform allocation?)."""
    uniform = label.endswith(" [uniform]")
    base = label.removesuffix(" [uniform]")
    return ("random" if base.startswith("random") else base), uniform


def plot(args, dense, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("acc_cut", "as cut (no retraining)"),
        ("acc_bn", "+ BN statistics re-estimated (no weight update)"),
        ("acc_ft", f"+ fine-tune {args.finetune_epochs} epoch"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    series: dict[tuple[str, bool], dict[float, list[tuple[float, float]]]] = {}
    for key, _ in panels:
        for r in rows:
            if key in r:
                series.setdefault((*_series(r["criterion"]), key), {}).setdefault(r["target"], []).append(
                    (r["removed"], r[key])
                )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for (name, uniform, k), pts in series.items():
            if k != key:
                continue
            targets = sorted(pts)
            xs = [0.0] + [sum(p[0] for p in pts[t]) / len(pts[t]) for t in targets]
            ys = [dense["accuracy"]] + [sum(p[1] for p in pts[t]) / len(pts[t]) for t in targets]
            style = ":" if uniform else "--" if name.startswith("ifso (") else "-"
            label = (
                name + (" [uniform]" if uniform else "") + (" (mean of seeds)" if name == "random" else "")
            )
            color = COLORS.get(name, "black")
            ax.plot(xs, ys, style, marker="s" if uniform else "o", color=color, label=label, lw=1.6)
            if name == "random" and len(pts[targets[0]]) > 1:
                lo = [dense["accuracy"]] + [min(p[1] for p in pts[t]) for t in targets]
                hi = [dense["accuracy"]] + [max(p[1] for p in pts[t]) for t in targets]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12 if not uniform else 0.06)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of FLOPs removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (MNIST, 1,000 images)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle(
        f"{args.arch} on MNIST (seeded 4k/1k split): accuracy vs FLOPs removed. Solid: global ranking; "
        "dotted: uniform per-layer allocation; dashed: IFSO variants; band: random min-max over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
