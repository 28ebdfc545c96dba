"""Benchmark of error compensation: criterion × compensation × head mode × ratio × calibration size.

Each row runs in a fresh subprocess under the shared CPU lock (``flock /tmp/minillm-bench.lock``):
load the float32 model, sample the calibration windows from the calibration text, score, plan,
compensate block by block on the pruned prefix (:mod:`minillm.compensation.sequential`), cut, then
measure perplexity on the test text (the first ``--eval-windows`` 128-token windows, and all windows
with ``--all-windows``). Peak RSS is read right after the cut (before evaluation) and divided by the
peak of a plain forward pass over the same calibration set (its own subprocess, ``forward`` row).

    python tools/bench_compensation.py run --model ~/.cache/minillm-bench/smollm2-135m \
        --calib ../shared/data/text/wiki.train.txt --test ../shared/data/text/wiki.test.txt \
        --rows flap:refit:kv,flap:bias:kv,obs:refit:query --ratio 0.2 --calib-samples 128 \
        --jsonl docs/bench/compensation.jsonl
    python tools/bench_compensation.py table --jsonl docs/bench/compensation.jsonl

A row is ``criterion:compensation:head_mode[:allocation]`` (allocation ``uniform`` when left out, or
``global``, ``log``, ``error``); criterion ``obs`` means OBS selection in the sequential pass (the plan's
counts from the allocation, groups chosen on the pruned prefix's moments).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

from minillm.defaults import CompensationTarget

LOCK = "/tmp/minillm-bench.lock"


def _child(args: argparse.Namespace) -> None:
    """Every row of ``--row a;b;…`` in one process (one model load, one lock hold). Peak RSS is the
    process's so far, so only the first row's ``peak`` is its own; later rows report ``peak: null``."""
    for number, row in enumerate(args.row.split(";")):
        _one_row(argparse.Namespace(**{**vars(args), "row": row}), first=number == 0)


def _one_row(args: argparse.Namespace, first: bool) -> None:
    import torch

    from minillm.api import count_parameters, plan_from_scores, score_model
    from minillm.arch import adapter_for
    from minillm.calibration.data import calibration_set, evaluation_windows
    from minillm.calibration.forward import mean_loss
    from minillm.compensation.bias import compensate
    from minillm.compensation.layer import CompensationOptions
    from minillm.compensation.sequential import compensate_sequential
    from minillm.cut import selection
    from minillm.evaluate.perplexity import perplexity
    from minillm.loading import load_model, load_tokenizer
    from minillm.memory import peak_rss_bytes
    from minillm.surgery import apply_plan

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device_map="cpu", dtype="float32")
    calibration = calibration_set(tokenizer, args.calib, args.calib_samples, 128, 0, 8)
    row: dict = {"row": args.row, "ratio": args.ratio, "calib_samples": args.calib_samples,
                 "damping": args.damping, "after_load": peak_rss_bytes()}
    if args.precision != "float64":
        row["precision"] = args.precision
    if args.target != "pruned":
        row["target"] = args.target
    start = time.perf_counter()
    if args.row == "forward":
        mean_loss(model, calibration)
        row.update(peak=peak_rss_bytes(), seconds=round(time.perf_counter() - start, 1))
        print(json.dumps(row), flush=True)
        return
    criterion, mode, head_mode, allocation = _fields(args.row)
    model = model if first else load_model(args.model, device_map="cpu", dtype="float32")
    adapter = adapter_for(model.config)
    layers = list(range(len(adapter.decoder_layers(model))))
    score = score_model(model, "magnitude" if criterion == "obs" else criterion, calibration, layers)
    plan = plan_from_scores(model, score, args.ratio, allocation, head_mode, calibration=calibration,
                            damping=args.damping)
    scored = time.perf_counter()
    if mode == "flap-bias":  # today's FLAP bias: dense-model means, folded before the cut
        compensate(model, adapter, plan, score.compensation)
        passes = 0
    else:
        select = selection(criterion, mode, not args.no_reselect)  # as minillm prune chooses
        options = CompensationOptions(mode=mode, damping=args.damping, precision=args.precision,
                                      target=args.target, select=select)  # type: ignore[arg-type]
        row["select"] = select
        result = compensate_sequential(model, adapter, plan, calibration, options)
        plan, passes = result.plan, result.forward_passes
    apply_plan(model, adapter, plan)
    row.update(peak=peak_rss_bytes() if first else None, scoring_seconds=round(scored - start, 1),
               compensation_seconds=round(time.perf_counter() - scored, 1), passes=passes,
               achieved_ratio=round(1 - count_parameters(model) / plan.params_before, 4),
               heads=len(plan.layers[0].heads), kv_heads=len(plan.layers[0].kv_heads),
               channels=len(plan.layers[0].channels),
               widths=[[len(p.heads), len(p.kv_heads), len(p.channels)] for p in plan.layers])
    windows = evaluation_windows(tokenizer, args.test, 128)
    row["ppl64"] = round(perplexity(model, windows[:64], 8).perplexity, 3)
    if args.all_windows:
        row["ppl_all"] = round(perplexity(model, windows, 8).perplexity, 3)
        row["windows"] = int(windows.shape[0])
    print(json.dumps(row), flush=True)


def _fields(row: str) -> tuple[str, str, str, str]:
    """``criterion:compensation:head_mode[:allocation]`` (rows written before allocations: uniform)."""
    parts = row.split(":")
    return (*parts[:3], parts[3] if len(parts) > 3 else "uniform")  # type: ignore[return-value]


def _widths(r: dict) -> str:
    """First-layer widths for uniform plans; first → last layer for per-layer ones."""
    first = f"{r['heads']}/{r['kv_heads']}/{r['channels']}"
    every = r.get("widths")
    if not every or len({tuple(w) for w in every}) == 1:
        return first
    return f"{first} → {'/'.join(str(x) for x in every[-1])} (MLP {min(w[2] for w in every)}–" \
           f"{max(w[2] for w in every)})"


def _dense(args: argparse.Namespace) -> None:
    from minillm.calibration.data import evaluation_windows
    from minillm.evaluate.perplexity import perplexity
    from minillm.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device_map="cpu", dtype="float32")
    windows = evaluation_windows(tokenizer, args.test, 128)
    row = {"row": "dense", "ppl64": round(perplexity(model, windows[:64], 8).perplexity, 3)}
    if args.all_windows:
        row["ppl_all"] = round(perplexity(model, windows, 8).perplexity, 3)
        row["windows"] = int(windows.shape[0])
    print(json.dumps(row), flush=True)


def _run(args: argparse.Namespace) -> None:
    for name in args.rows:  # a name "a;b" runs rows a and b in one process (one hold of the lock)
        command = [sys.executable, __file__, "dense" if name == "dense" else "row", "--row", name,
                   "--model", args.model, "--calib", args.calib, "--test", args.test,
                   "--ratio", str(args.ratio), "--calib-samples", str(args.calib_samples),
                   "--damping", str(args.damping), "--threads", str(args.threads),
                   "--precision", args.precision, "--target", args.target]
        if args.no_reselect:
            command.append("--no-reselect")
        if args.all_windows:
            command.append("--all-windows")
        output = subprocess.run(["flock", LOCK, "nice", "-n", "2", *command], check=True,
                                capture_output=True, text=True).stdout
        for line in [x for x in output.strip().splitlines() if x.startswith("{")]:
            print(line, flush=True)
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")


def _table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    dense = next((r for r in rows if r["row"] == "dense"), None)
    forward = {r["calib_samples"]: r for r in rows if r["row"] == "forward"}
    print("| criterion | compensation | head mode | allocation | ratio | calib | ppl (64 win) | × dense "
          "| ppl (all) | × dense | peak RSS GB | peak × forward | scoring s | compensation s "
          "| widths (q/kv/mlp) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["row"] in ("dense", "forward"):
            continue
        criterion, mode, head_mode, allocation = _fields(r["row"])
        x64 = f"{r['ppl64'] / dense['ppl64']:.2f}" if dense else "-"
        ppl_all = r.get("ppl_all")
        x_all = f"{ppl_all / dense['ppl_all']:.2f}" if ppl_all and dense and dense.get("ppl_all") else "-"
        probe = forward.get(r["calib_samples"])
        peak = f"{r['peak'] / 1e9:.2f}" if r.get("peak") else "-"
        ratio = f"{r['peak'] / probe['peak']:.2f}" if probe and r.get("peak") else "-"
        if r.get("precision"):
            mode = f"{mode} (H in {r['precision']})"
        if r.get("target"):
            mode = f"{mode}, {r['target']} target"
        if r.get("select") == "fluctuation":
            mode = f"{mode}, re-chosen on the prefix"
        cells = [criterion, mode, head_mode, allocation, r["ratio"], r["calib_samples"], f"{r['ppl64']:.2f}",
                 x64, ppl_all or "-", x_all, peak, ratio, r["scoring_seconds"], r["compensation_seconds"],
                 _widths(r)]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if dense:
        every = f", {dense['ppl_all']} (all {dense['windows']})" if dense.get("ppl_all") else ""
        print(f"\ndense: ppl {dense['ppl64']} (64 windows){every}")
    for samples, probe in sorted(forward.items()):
        print(f"plain forward over {samples} calibration windows: peak RSS {probe['peak'] / 1e9:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "row", "dense", "table"])
    parser.add_argument("--model")
    parser.add_argument("--calib")
    parser.add_argument("--test")
    parser.add_argument("--row", default="")
    parser.add_argument("--rows", type=lambda s: s.split(","), default=[],
                        help="Comma-separated rows; rows joined by ';' share one process.")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["float64", "float32"], default="float64",
                        help="dtype of the compensation's moments H")
    parser.add_argument("--target", choices=list(get_args(CompensationTarget)), default="pruned",
                        help="the refit's target: the layer's output on the pruned prefix, the dense "
                        "model's, or (block) the dense block's output on the pruned prefix's input")
    parser.add_argument("--no-reselect", action="store_true",
                        help="flap: keep the dense model's choice (prune's --no-reselect)")
    parser.add_argument("--all-windows", action="store_true")
    parser.add_argument("--jsonl", default="docs/bench/compensation.jsonl")
    args = parser.parse_args()
    {"run": _run, "row": _child, "dense": _dense, "table": _table}[args.command](args)


if __name__ == "__main__":
    main()
