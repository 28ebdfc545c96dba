"""Benchmark of the prune spine: perplexity dense vs pruned, scoring memory vs a plain forward, wall time.

Run (CPU-sized, about 30-60 minutes on 2 cores; the model comes from ../shared/tools/get-bench-model):

    python tools/bench_prune.py --model ~/.cache/minillm-bench/smollm2-135m \
        --calib ../shared/data/text/wiki.train.txt --test ../shared/data/text/wiki.test.txt \
        --ratio 0.2 --allocations uniform,global --seq-lens 128,512 --json docs/bench/prune.json

Memory: each measurement runs in a fresh subprocess (peak RSS never goes down inside one process) that
loads the model, builds the same calibration batch, then runs either a plain forward pass computing the
calibration loss (``forward``) or FMS-SPSA scoring (``fms``); the ratio of the two peaks is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from minillm.api import prune
from minillm.calibration.data import calibration_set, evaluation_windows
from minillm.calibration.forward import mean_loss
from minillm.evaluate.perplexity import perplexity
from minillm.loading import load_model, load_tokenizer
from minillm.memory import peak_rss_bytes


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: print peak RSS after load and after the measured work, as JSON."""
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device_map="cpu", dtype="float32")
    calibration = calibration_set(tokenizer, args.calib, args.calib_samples, args.calib_seq_len, 0,
                                  args.batch_size)
    after_load = peak_rss_bytes()
    start = time.perf_counter()
    if args.mode == "forward":
        mean_loss(model, calibration)
    else:
        prune(model, ratio=args.ratio, calib=calibration, criterion=args.mode, spsa_steps=args.spsa_steps,
              dry_run=True)
    print(json.dumps({"mode": args.mode, "after_load": after_load, "peak": peak_rss_bytes(),
                      "seconds": time.perf_counter() - start}))


def _probe(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, __file__, "probe", "--mode", mode, "--model", args.model,
               "--calib", args.calib, "--calib-samples", str(args.calib_samples),
               "--calib-seq-len", str(args.calib_seq_len), "--batch-size", str(args.batch_size),
               "--spsa-steps", str(args.spsa_steps), "--ratio", str(args.ratio)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _ppl(model, windows: dict[int, object], batch_size: int) -> dict[int, float]:
    return {seq: round(perplexity(model, w, batch_size).perplexity, 3) for seq, w in windows.items()}


def run(args: argparse.Namespace) -> None:
    results: dict = {"settings": vars(args).copy()}
    results["settings"].pop("func", None)
    if not args.skip_memory:
        memory = {mode: _probe(args, mode) for mode in ("forward", "fms")}
        results["memory"] = memory
        results["memory"]["peak_ratio"] = memory["fms"]["peak"] / memory["forward"]["peak"]
        print(json.dumps(results["memory"], indent=1), flush=True)

    tokenizer = load_tokenizer(args.model)
    windows = {}
    for seq in args.seq_lens:
        w = evaluation_windows(tokenizer, args.test, seq)
        windows[seq] = w[: args.eval_windows] if args.eval_windows else w
    results["windows"] = {seq: int(w.shape[0]) for seq, w in windows.items()}
    if not args.skip_dense:
        dense = load_model(args.model, device_map="cpu", dtype="float32")
        start = time.perf_counter()
        results["dense"] = {"ppl": _ppl(dense, windows, args.batch_size),
                            "params": sum(p.numel() for p in dense.parameters())}
        results["dense"]["eval_seconds"] = time.perf_counter() - start
        print(json.dumps(results["dense"]), flush=True)
        del dense
    calibration = calibration_set(tokenizer, args.calib, args.calib_samples, args.calib_seq_len, 0,
                                  args.batch_size)
    results["pruned"] = []
    for allocation in args.allocations:
        for structures in args.structures:
            model = load_model(args.model, device_map="cpu", dtype="float32")
            outcome = prune(model, ratio=args.ratio, calib=calibration, criterion=args.criterion,
                            allocation=allocation, structures=structures, spsa_steps=args.spsa_steps)
            row = {"allocation": allocation, "structures": structures, "criterion": args.criterion,
                   "achieved_ratio": round(outcome.plan.achieved_ratio, 4),
                   "params": outcome.plan.params_after,
                   "scoring_seconds": round(outcome.scoring.seconds, 1),
                   "total_seconds": round(outcome.total_seconds, 1),
                   "ppl": _ppl(outcome.model, windows, args.batch_size)}
            results["pruned"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "probe"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--test", default=None)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criterion", default="fms")
    parser.add_argument("--allocations", type=lambda s: s.split(","), default=["uniform", "global"])
    parser.add_argument("--structures", type=lambda s: s.split(","), default=["both"])
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    parser.add_argument("--eval-windows", type=int, default=0,
                        help="Evaluate only the first N windows (0 = all).")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--spsa-steps", type=int, default=16)
    parser.add_argument("--mode", default="fms")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-memory", action="store_true", help="Skip the two memory probes.")
    parser.add_argument("--skip-dense", action="store_true", help="Skip the dense perplexity rows.")
    args = parser.parse_args()
    memory_probe(args) if args.command == "probe" else run(args)


if __name__ == "__main__":
    main()
