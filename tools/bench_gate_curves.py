"""How good are forward-only gradient estimates? Cosine / Spearman curves against exact references.

For the benchmark model on a small calibration batch (the issue's 4×128 tokens) this measures, as a
function of the number of passes over the batch:

* ``fms-gate`` (SPSA on one gate per group) and ``fwd-grad`` (forward-mode jvp, one tangent per
  sequence): cosine and Spearman of the estimated gate gradient with ``taylor-gate``'s exact one;
* ``fms-gate`` and ``fms`` (per-weight SPSA) group scores: Spearman with ``fms-bp``'s scores (FMS with
  back-propagated gradients) — issue 3's target;
* the ``sqrt(K / (K + d))`` law of a K-direction random estimator in d dimensions, for reference.

SPSA step = 2 forward passes; a jvp pass is counted as one pass (it costs about two forwards of time;
the measured seconds per pass are printed). Run (CPU-sized, under the shared lock):

    flock /tmp/minillm-cpu.lock nice -n 5 python tools/bench_gate_curves.py \\
        --model ~/.cache/minillm-bench/smollm2-135m --calib ../shared/data/text/wiki.train.txt \\
        --samples 4 --seq-len 128 --spsa 4,16,64,256 --fwd 8,32,128 --fms 16,64 --out /tmp/curves
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def flat_scores(scores: dict, layers: list[int]) -> torch.Tensor:
    """Heads then channels of every layer, in the gate layout's order (key/value heads left out)."""
    return torch.cat([torch.cat([scores[i].heads, scores[i].channels]) for i in layers]).double()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spsa", default="4,16,64,256", help="SPSA step counts for fms-gate")
    parser.add_argument("--fwd", default="8,32,128", help="jvp pass counts for fwd-grad")
    parser.add_argument("--fms", default="16,64", help="SPSA step counts for per-weight fms ('' to skip)")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--layers", default="", help="comma-separated layers to gate (default: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from minillm.api import layer_shapes
    from minillm.arch import adapter_for
    from minillm.calibration.data import calibration_set
    from minillm.calibration.forward import mean_loss
    from minillm.calibration.spsa import SpsaConfig, SpsaEstimate, estimate_gradient
    from minillm.calibration.stats import collect_input_stats
    from minillm.groups import sum_by_group
    from minillm.loading import load_model, load_tokenizer
    from minillm.scoring.base import ScoringContext
    from minillm.scoring.fms import fms_importance
    from minillm.scoring.fms_bp import score_fms_bp
    from minillm.scoring.fms_gate import gate_spsa
    from minillm.scoring.fwd_grad import forward_gradient
    from minillm.scoring.gates import GateLayout, gate_gradients

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spsa_ks = [int(k) for k in args.spsa.split(",") if k]
    fwd_ps = [int(k) for k in args.fwd.split(",") if k]
    fms_ks = [int(k) for k in args.fms.split(",") if k]
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device_map="cpu", dtype="float32")
    adapter = adapter_for(model.config)
    layers = [int(i) for i in args.layers.split(",") if i] or list(range(len(adapter.decoder_layers(model))))
    calibration = calibration_set(tokenizer, args.calib, args.samples, args.seq_len, args.seed, args.samples)
    ctx = ScoringContext(
        model=model,
        adapter=adapter,
        layers=layers,
        shapes=layer_shapes(model, adapter),
        calibration=calibration,
        seed=args.seed,
        spsa=SpsaConfig(steps=max(spsa_ks), eps=args.eps, seed=args.seed),
    )
    layout = GateLayout.from_context(ctx)
    d = layout.size
    results: dict = {"d_gates": d, "calibration": f"{args.samples}x{args.seq_len}", "curves": {}}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.perf_counter()
    exact = gate_gradients(ctx, layout).gradient
    results["taylor_gate_seconds"] = time.perf_counter() - start
    log(f"taylor-gate exact gradient: {results['taylor_gate_seconds']:.1f}s, d={d}")
    start = time.perf_counter()
    bp = flat_scores(score_fms_bp(ctx).scores, layers)
    results["fms_bp_seconds"] = time.perf_counter() - start
    results["spearman_taylor_gate_vs_fms_bp"] = spearman(exact.abs(), bp)
    log(
        f"fms-bp: {results['fms_bp_seconds']:.1f}s; spearman(|taylor-gate|, fms-bp)="
        f"{results['spearman_taylor_gate_vs_fms_bp']:.3f}"
    )

    start = time.perf_counter()
    estimate, gates = gate_spsa(ctx, layout)
    seconds = time.perf_counter() - start
    curve = []
    for k in spsa_ks:
        partial = SpsaEstimate(estimate.config, estimate.coefficients[:k])
        g = partial.gradient(0, torch.ones_like(gates)).double()
        curve.append(
            {
                "steps": k,
                "passes": 2 * k,
                "cosine": cosine(g, exact),
                "spearman_vs_taylor_gate": spearman(g.abs(), exact.abs()),
                "spearman_vs_fms_bp": spearman(g.abs(), bp),
                "sqrt_law": math.sqrt(k / (k + d)),
            }
        )
        log(f"fms-gate K={k}: {curve[-1]}")
    results["curves"]["fms-gate"] = {"seconds_per_pass": seconds / (2 * max(spsa_ks)), "points": curve}

    start = time.perf_counter()
    history = forward_gradient(ctx, layout, max(fwd_ps))
    seconds = time.perf_counter() - start
    curve = []
    for p in fwd_ps:
        g = history[p - 1]
        k = p * args.samples
        curve.append(
            {
                "passes": p,
                "directions": k,
                "cosine": cosine(g, exact),
                "spearman_vs_taylor_gate": spearman(g.abs(), exact.abs()),
                "spearman_vs_fms_bp": spearman(g.abs(), bp),
                "sqrt_law": math.sqrt(k / (k + d)),
            }
        )
        log(f"fwd-grad P={p}: {curve[-1]}")
    results["curves"]["fwd-grad"] = {"seconds_per_pass": seconds / max(fwd_ps), "points": curve}

    if fms_ks:
        linears = ctx.linears()
        stats = collect_input_stats(linears, lambda: ctx.run.run())  # one walk through the blocks
        weights = [lin.weight for lin in linears]
        start = time.perf_counter()
        config = SpsaConfig(steps=max(fms_ks), eps=args.eps, seed=args.seed)
        est = estimate_gradient(weights, lambda: mean_loss(model, calibration), config)
        seconds = time.perf_counter() - start
        position = {lin: i for i, lin in enumerate(linears)}
        curve = []
        for k in fms_ks:
            partial = SpsaEstimate(est.config, est.coefficients[:k])

            def importance(linear, _partial=partial):
                grad = _partial.gradient(position[linear], linear.weight)
                return fms_importance(linear.weight, grad, stats[linear].mean_abs)

            with torch.no_grad():
                scores = {i: sum_by_group(adapter, ctx.layer(i), ctx.shapes[i], importance) for i in layers}
            flat = flat_scores(scores, layers)
            curve.append({"steps": k, "passes": 2 * k, "spearman_vs_fms_bp": spearman(flat, bp)})
            log(f"fms K={k}: {curve[-1]}")
        results["curves"]["fms"] = {
            "seconds_per_pass": seconds / (2 * max(fms_ks)),
            "points": curve,
            "d_weights": sum(w.numel() for w in weights),
        }

    (out / "curves.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "gate_curves.png")
    log(f"wrote {out / 'curves.json'} and {out / 'gate_curves.png'}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    d = results["d_gates"]
    for name, marker in (("fms-gate", "o"), ("fwd-grad", "s")):
        points = results["curves"][name]["points"]
        xs = [p["passes"] for p in points]
        left.plot(xs, [p["cosine"] for p in points], marker=marker, label=f"{name}: cosine vs taylor-gate")
        right.plot(
            xs, [p["spearman_vs_taylor_gate"] for p in points], marker=marker, label=f"{name} vs taylor-gate"
        )
        right.plot(
            xs,
            [p["spearman_vs_fms_bp"] for p in points],
            marker=marker,
            linestyle="--",
            label=f"{name} vs fms-bp",
        )
    if "fms" in results["curves"]:
        points = results["curves"]["fms"]["points"]
        right.plot(
            [p["passes"] for p in points],
            [p["spearman_vs_fms_bp"] for p in points],
            marker="^",
            linestyle="--",
            label="fms (per-weight SPSA) vs fms-bp",
        )
    xs = sorted({p["passes"] for c in results["curves"].values() for p in c["points"]})
    left.plot(
        xs,
        [math.sqrt((x / 2) / (x / 2 + d)) for x in xs],
        color="grey",
        linestyle=":",
        label="sqrt(K/(K+d)), K = passes/2 (SPSA)",
    )
    spsa_dirs = results["curves"]["fwd-grad"]["points"]
    left.plot(
        [p["passes"] for p in spsa_dirs],
        [p["sqrt_law"] for p in spsa_dirs],
        color="black",
        linestyle=":",
        label="sqrt(K/(K+d)), K = passes x sequences (fwd-grad)",
    )
    for ax, title in ((left, f"gate-gradient cosine (d = {d} gates)"), (right, "Spearman of group scores")):
        ax.set_xscale("log")
        ax.set_xlabel("passes over the calibration batch (SPSA step = 2, jvp = 1)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
