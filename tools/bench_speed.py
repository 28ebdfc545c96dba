"""Speed of pruned models vs the dense one, timed interleaved in one process (issue 8).

Prefill and decode tokens/s at a few batch sizes and prompt lengths, peak extra memory, latency ratios
to the dense model (medians of interleaved repeats; see minillm/speed.py). Run it under the CPU lock:

    flock /tmp/minillm-cpu.lock nice -n 5 python tools/bench_speed.py \
        --dense /root/.cache/minillm-bench/smollm2-135m \
        --pruned uniform=/tmp/pruned-uniform --pruned global=/tmp/pruned-global --json speed.json

CPU-sized smoke run: add ``--batch-sizes 1 --prompt-lens 32 --new-tokens 4 --repeats 2``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from minillm.loading import load_model
from minillm.speed import benchmark, cases, geometric_mean, markdown, parse_ints, pin_threads, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True)
    parser.add_argument("--pruned", action="append", required=True, help="label=folder (repeatable)")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--prompt-lens", default="64,256")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=None, help="pinned CPU threads (default: all)")
    args = parser.parse_args()
    threads, cpus = pin_threads(args.threads)
    models = {"dense": load_model(args.dense, device_map=args.device, dtype="float32")}
    for spec in args.pruned:
        label, _, folder = spec.partition("=")
        models[label] = load_model(folder, device_map=args.device, dtype="float32")
    speed_cases = cases(
        parse_ints(args.batch_sizes, "--batch-sizes"),
        parse_ints(args.prompt_lens, "--prompt-lens"),
        args.new_tokens,
    )
    rows = benchmark(
        models,
        speed_cases,
        args.repeats,
        args.warmup,
        progress=lambda t, d, n: print(f"{t}: {d}/{n}", flush=True) if d % 8 == 0 or d == n else None,
    )
    table = markdown(rows, "dense")
    print(
        f"\ndevice {args.device}, {threads} torch threads pinned to CPUs {cpus}, "
        f"{platform.processor() or platform.machine()}, "
        f"median of {args.repeats} interleaved repeats (+{args.warmup} warm-up)\n"
    )
    print(table)
    summary = {}
    for label in models:
        if label == "dense":
            continue
        r = [x for x in ratios(rows, "dense") if x["model"] == label]
        summary[label] = {
            "prefill_latency_ratio_geomean": geometric_mean([x["prefill_latency_ratio"] for x in r]),
            "decode_latency_ratio_geomean": geometric_mean([x["decode_latency_ratio"] for x in r]),
            "params_ratio": r[0]["params_ratio"],
        }
        print(
            f"{label}: params {r[0]['params_ratio']:.3f}× dense; latency (geometric mean over cases) prefill "
            f"{summary[label]['prefill_latency_ratio_geomean']:.3f}×, decode "
            f"{summary[label]['decode_latency_ratio_geomean']:.3f}×"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": [r.to_dict() for r in rows],
                    "ratios": ratios(rows, "dense"),
                    "summary": summary,
                    "args": vars(args),
                    "threads": threads,
                    "cpus": cpus,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
