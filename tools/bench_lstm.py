"""Benchmark of LSTM hidden-state pruning and dynamic sparse training on a PTB-style corpus (issue 7).

What it measures, all on one machine in one run, single-threaded (``--threads 1``: on a shared box
OpenMP barriers across busy cores make multi-threaded LSTM timings meaningless):

1. a dense 2-layer word LSTM LM trained for ``--epochs`` (cached under ``--cache``, reused by reruns);
2. for every criterion and kept fraction of hidden units: test perplexity right after surgery and
   after a short fine-tune (``--finetune-steps``); the 100 % row is the dense model with the same
   fine-tune, so every row had the same extra training;
3. inference time of the smaller models (whole LM and the LSTM stack alone; batch 1 and batch 20);
4. DST (α·Σexp(−t), reference-code default α = 1e-4) trained from the same initialisation for the same
   epochs: final sparsity per layer and test perplexity next to the dense model.

Run (the figures in docs/benchmarks.md; roughly 25 min of CPU time on one core):

    nice -n 5 python tools/bench_lstm.py --data ../shared/data/text/ptb-style \\
        --markdown docs/bench_lstm.md --plot docs/img/lstm_pruning.png

CPU-sized smoke run (about a minute):

    python tools/bench_lstm.py --data ../shared/data/text/ptb-style --max-steps 20 --finetune-steps 5 \\
        --eval-windows 10 --spsa-steps 2 --gl-steps 5 --cache /tmp/bench_lstm_smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/text/ptb-style"))
    p.add_argument("--embed", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps (0 = all epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--keep", default="1.0,0.75,0.5,0.25")
    p.add_argument("--criteria", default="magnitude,group_lasso,activation,fms,random")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--spsa-steps", type=int, default=32)
    p.add_argument("--gl-lambda", type=float, default=5e-3,
                   help="group-lasso λ; ≈ the median per-unit ‖∂CE/∂group‖ of the dense model")
    p.add_argument("--gl-steps", type=int, default=200)
    p.add_argument("--dst-alpha", type=float, default=1e-4)
    p.add_argument("--no-dst", action="store_true")
    p.add_argument("--eval-windows", type=int, default=0, help="cap on test windows (0 = whole split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("runs/bench_lstm"))
    p.add_argument("--only-dense", action="store_true", help="train (or load) the dense model and stop")
    p.add_argument("--only-speed", action="store_true", help="time the smaller models and stop")
    p.add_argument("--speed-repeats", type=int, default=100, help="timed runs per model (median)")
    p.add_argument("--clock", default="thread", choices=["thread", "wall"],
                   help="thread CPU time (robust on a shared box; needs --threads 1) or wall time")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    return p.parse_args()


STARTED = (time.process_time(), time.perf_counter())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Clock:
    """Wall and CPU seconds of a block (CPU time is what the shared-box budget counts)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from minillm.calibration.spsa import SpsaConfig
    from minillm.lstm.api import DstSettings, PruneSettings, score_units, train_model
    from minillm.lstm.data import Corpus
    from minillm.lstm.export import load_model, save_model
    from minillm.lstm.model import LstmLm, LstmLmConfig, count_parameters
    from minillm.lstm.plan import plan_from_scores
    from minillm.lstm.speed import inference_speed
    from minillm.lstm.surgery import apply_plan, check_fused
    from minillm.lstm.train import TrainConfig, evaluate_nll, perplexity, train_lm

    corpus = Corpus.load(args.data)
    config = LstmLmConfig(vocab_size=len(corpus.vocab), embed_size=args.embed,
                          hidden_sizes=(args.hidden, args.hidden), dropout=args.dropout)
    train_config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps or None, lr=args.lr,
                               batch_size=args.batch_size, bptt=args.bptt, seed=args.seed)
    finetune = TrainConfig(epochs=1, max_steps=args.finetune_steps, lr=args.finetune_lr,
                           batch_size=args.batch_size, bptt=args.bptt, seed=args.seed + 1)
    windows = args.eval_windows or None

    def test_ppl(model: LstmLm) -> float:
        nll = evaluate_nll(model, corpus.test, batch_size=10, bptt=args.bptt, max_windows=windows)
        return perplexity(nll)

    def initial_model() -> LstmLm:
        return LstmLm(config, torch.Generator().manual_seed(args.seed))

    key = (f"e{args.embed}-h{args.hidden}-d{args.dropout}-ep{args.epochs}-s{args.max_steps}"
           f"-lr{args.lr}-seed{args.seed}")
    dense_dir = args.cache / f"dense-{key}"
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "config": config.to_dict()}
    if dense_dir.exists():
        dense = load_model(dense_dir).model
        results["dense"] = json.loads((dense_dir / "metrics.json").read_text())
        log(f"loaded dense model from {dense_dir}")
    else:
        log(f"training dense model {config.hidden_sizes} for {args.epochs} epochs")
        dense = initial_model()
        with Clock() as clock:
            summary = train_model(dense, corpus, train_config)
        results["dense"] = {"valid_ppl": summary.valid_ppl, "test_ppl": summary.test_ppl,
                            "steps": summary.steps, "train_cpu_s": clock.cpu, "train_wall_s": clock.wall,
                            "parameters": summary.parameters}
        save_model(dense, corpus.vocab, dense_dir, {"metrics.json": results["dense"]})
    log(f"dense: {results['dense']}")
    if args.only_dense:
        return

    keeps = [float(k) for k in args.keep.split(",")]
    criteria = args.criteria.split(",")
    settings = PruneSettings(calib_windows=args.calib_windows, calib_batch_size=16, bptt=args.bptt,
                             spsa=SpsaConfig(steps=args.spsa_steps, eps=1e-3, seed=args.seed),
                             group_lasso=args.gl_lambda, group_lasso_steps=args.gl_steps,
                             finetune=finetune, seed=args.seed)

    # --- speed of the smaller LSTMs (criterion-independent: only the widths matter) ---
    speed_rows = []
    for keep in keeps:
        plan = plan_from_scores([torch.arange(h, 0, -1).float() for h in config.hidden_sizes], keep)
        model = apply_plan(dense, plan)
        row = {"keep": keep, "hidden": list(model.config.hidden_sizes), "parameters": count_parameters(model),
               "fused_error": max(e for rnn in model.rnns for e in check_fused(rnn).values())}
        for batch in (1, 20):
            speed = inference_speed(model, batch_size=batch, seq_len=args.bptt, repeats=args.speed_repeats,
                                    seed=args.seed, clock=args.clock)
            row[f"lm_ms_b{batch}"], row[f"lstm_ms_b{batch}"] = speed.lm_ms, speed.lstm_ms
        speed_rows.append(row)
        log(f"speed {row}")
    results["speed"] = speed_rows
    if args.only_speed:
        finish(results, args)
        return

    # --- criteria × kept fraction, short fine-tune ---
    prune_rows = []
    dense_test = results["dense"]["test_ppl"]
    finetuned_cache: dict[str, float] = {}

    def finetuned_ppl(model: LstmLm, key: str) -> float:
        """Test ppl after the short fine-tune of a copy of ``model`` (cached: the dense one is shared)."""
        if key not in finetuned_cache:
            tuned = copy.deepcopy(model)
            train_lm(tuned, corpus.train, finetune)
            finetuned_cache[key] = test_ppl(tuned)
        return finetuned_cache[key]

    for name in criteria:
        base = copy.deepcopy(dense)
        scoring = PruneSettings(**{**settings.__dict__, "criterion": name, "keep_ratio": 1.0})
        with Clock() as score_clock:
            scores = score_units(base, corpus, scoring)
        log(f"scored {name} in {score_clock.cpu:.1f} s CPU")
        pairs = zip(base.parameters(), dense.parameters(), strict=True)
        # group lasso trains the model it scores (SPSA only leaves rounding-level traces)
        trained = any(not torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in pairs)
        for keep in keeps:
            if keep == 1.0:  # nothing removed: the dense model, or the model the criterion trained
                prune_rows.append({
                    "criterion": name, "keep": keep, "score_cpu_s": score_clock.cpu,
                    "ppl_pruned": test_ppl(base) if trained else dense_test,
                    "ppl_finetuned": finetuned_ppl(base, name if trained else "dense"),
                })
                continue
            plan = plan_from_scores(scores, keep, name)
            model = apply_plan(base, plan)
            row = {"criterion": name, "keep": keep, "hidden": list(model.config.hidden_sizes),
                   "ppl_pruned": test_ppl(model), "score_cpu_s": score_clock.cpu}
            with Clock() as ft_clock:
                train_lm(model, corpus.train, finetune)
            row["ppl_finetuned"] = test_ppl(model)
            row["finetune_cpu_s"] = ft_clock.cpu
            prune_rows.append(row)
            log(f"prune {row}")
    results["prune"] = prune_rows

    # --- SPSA diagnostic: cosine between the SPSA estimate and the backprop gradient ---
    results["spsa_cosine"] = spsa_cosine(dense, corpus, settings)
    log(f"spsa cosine {results['spsa_cosine']:.4f}")

    # --- DST vs dense, same initialisation and epochs ---
    if not args.no_dst:
        dst_model = initial_model()
        with Clock() as clock:
            summary = train_model(dst_model, corpus, train_config, dst=DstSettings(alpha=args.dst_alpha))
        results["dst"] = {"alpha": args.dst_alpha, "valid_ppl": summary.valid_ppl,
                          "test_ppl": summary.test_ppl, "density": summary.dst_density,
                          "layers": summary.dst_layers, "steps": summary.steps,
                          "train_cpu_s": clock.cpu, "train_wall_s": clock.wall}
        log(f"dst density {summary.dst_density:.4f} test ppl {summary.test_ppl:.2f}")

    finish(results, args)


def finish(results: dict, args: argparse.Namespace) -> None:
    """Print and write the tables, the JSON record and the plot."""
    results["total_cpu_s"] = time.process_time() - STARTED[0]
    results["total_wall_s"] = time.perf_counter() - STARTED[1]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results, args)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.plot and results.get("prune"):
        plot(results, args.plot)


def spsa_cosine(model, corpus, settings) -> float:
    """cos(Ĝ_SPSA, ∇L) over every parameter a hidden-unit group touches, on the calibration windows."""
    from minillm.calibration.spsa import estimate_gradient
    from minillm.lstm.api import calibration_windows
    from minillm.lstm.calibrate import window_loss
    from minillm.lstm.groups import group_params, unit_groups

    model = copy.deepcopy(model).eval()
    calib = calibration_windows(corpus, settings)
    params = group_params(model, unit_groups(model.config))
    estimate = estimate_gradient(params, lambda: window_loss(model, calib), settings.spsa)
    spsa = torch.cat([estimate.gradient(i, p).flatten() for i, p in enumerate(params)])
    model.zero_grad()
    state, count = None, 0
    for inputs, targets in calib:
        logits, state = model(inputs, state)
        state = [(h.detach(), c.detach()) for h, c in state]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum")
        loss.backward()
        count += targets.numel()
    exact = torch.cat([(p.grad / count).flatten() for p in params])
    return float(torch.nn.functional.cosine_similarity(spsa, exact, dim=0))


def markdown(results: dict, args: argparse.Namespace) -> str:
    """Tables for docs/benchmarks.md."""
    out = []
    dense = results["dense"]
    out.append(f"Dense model {results['config']['hidden_sizes']} (embed {results['config']['embed_size']}, "
               f"vocab {results['config']['vocab_size']}), {dense['steps']} steps: valid ppl "
               f"{dense['valid_ppl']:.2f}, test ppl {dense['test_ppl']:.2f}.\n")
    rows = results.get("prune", [])
    if rows:
        keeps = sorted({r["keep"] for r in rows}, reverse=True)
        crits = list(dict.fromkeys(r["criterion"] for r in rows))
        out.append("Test perplexity, pruned → after fine-tune "
                   f"({args.finetune_steps} steps, lr {args.finetune_lr}):\n")
        out.append("| criterion | " + " | ".join(f"{k:.0%} kept" for k in keeps) + " | scoring CPU s |")
        out.append("|---|" + "---:|" * (len(keeps) + 1))
        for c in crits:
            cells = []
            for k in keeps:
                r = next(x for x in rows if x["criterion"] == c and x["keep"] == k)
                cells.append(f"{r['ppl_pruned']:.1f} → {r['ppl_finetuned']:.1f}")
            score_s = next(x for x in rows if x["criterion"] == c)["score_cpu_s"]
            out.append(f"| {c} | " + " | ".join(cells) + f" | {score_s:.1f} |")
        out.append("")
    if results.get("speed"):
        base = results["speed"][0]
        out.append(f"Inference time in ms ({args.clock} clock, median of {args.speed_repeats} runs, "
                   f"{args.bptt} tokens, {args.threads} thread), speedup vs the first row:\n")
        out.append("| kept | hidden | params | LM ms B=1 | LSTM ms B=1 | LM ms B=20 | LSTM ms B=20 "
                   "| fused vs reference max abs diff |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in results["speed"]:
            cells = []
            for key in ("lm_ms_b1", "lstm_ms_b1", "lm_ms_b20", "lstm_ms_b20"):
                cells.append(f"{r[key]:.2f} ({base[key] / r[key]:.2f}×)")
            head = f"| {r['keep']:.0%} | {r['hidden']} | {r['parameters']:,} | "
            out.append(head + " | ".join(cells) + f" | {r.get('fused_error', float('nan')):.1e} |")
        out.append("")
    if "spsa_cosine" in results:
        out.append(f"SPSA ({args.spsa_steps} directions) vs backprop gradient, cosine over the group "
                   f"parameters: {results['spsa_cosine']:.4f}.\n")
    if "dst" in results:
        d = results["dst"]
        out.append(f"DST (α = {d['alpha']:g}) vs dense, same initialisation and {args.epochs} epochs:\n")
        out.append("| model | weight density (masked layers) | valid ppl | test ppl | train CPU s |")
        out.append("|---|---:|---:|---:|---:|")
        out.append(f"| dense | 1.000 | {dense['valid_ppl']:.2f} | {dense['test_ppl']:.2f} | "
                   f"{dense.get('train_cpu_s', float('nan')):.0f} |")
        out.append(f"| DST | {d['density']:.3f} | {d['valid_ppl']:.2f} | {d['test_ppl']:.2f} | "
                   f"{d['train_cpu_s']:.0f} |")
        out.append("\nSparsity learned per layer (density; LSTM rows split by gate i f g o; "
                   "rows left empty):\n")
        out.append("| layer | shape | density | i | f | g | o | empty rows | mean threshold |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in d["layers"]:
            gates = [f"{r['per_gate'][g]:.3f}" for g in "ifgo"] if r["per_gate"] else ["—"] * 4
            out.append(f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['density']:.3f} | "
                       + " | ".join(gates) + f" | {r['empty_rows']} | {r['threshold_mean']:.4f} |")
        out.append("")
    out.append(f"Total: {results['total_cpu_s'] / 60:.1f} min CPU, "
               f"{results['total_wall_s'] / 60:.1f} min wall.")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["prune"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["criterion"] for r in rows):
        pts = sorted((r["keep"], r["ppl_finetuned"]) for r in rows if r["criterion"] == name)
        ax.plot([100 * k for k, _ in pts], [p for _, p in pts], marker="o", label=name)
    ax.set_xlabel("hidden units kept (%)")
    ax.set_ylabel("test perplexity after fine-tune")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("LSTM hidden-state pruning (PTB-style corpus)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
