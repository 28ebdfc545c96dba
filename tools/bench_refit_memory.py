"""Peak memory of one closing projection's refit (the compensation's largest step), per dtype of ``H``.

Why: the streaming budget (:func:`minillm.streaming.compensation_bytes`) reserves room for this step;
this measures it on a 3B-shaped down_proj (in 6,912, out 2,560, 80 % of the inputs kept) in a fresh
process each, as peak RSS over the RSS with ``H`` already accumulated.

    python tools/bench_refit_memory.py                 # float64 and float32, H released or kept
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _one(dtype_name: str, release: bool, width: int, out: int) -> dict:
    import torch

    from minillm.compensation.hessian import InputMoments
    from minillm.compensation.refit import refit_weight
    from minillm.memory import peak_rss_bytes, return_large_frees_to_the_os, rss_bytes

    return_large_frees_to_the_os()
    torch.set_num_threads(1)
    moments = InputMoments.zeros(width, dtype=getattr(torch, dtype_name))
    batch = torch.randn(1024, width)
    for _ in range(4):
        moments.add(batch)
    del batch
    weight = torch.randn(out, width)
    keep = torch.tensor([i for i in range(width) if i % 5])
    before = rss_bytes()
    refit_weight(weight, moments, keep, 0.01, release=release)
    peak = peak_rss_bytes()
    return {"dtype": dtype_name, "release": release, "in": width, "out": out,
            "rss_with_h_gb": round(before / 1e9, 3), "solve_extra_gb": round((peak - before) / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6912)
    parser.add_argument("--out", type=int, default=2560)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # dtype:release, in a child
    args = parser.parse_args()
    if args.one:
        dtype_name, release = args.one.split(":")
        print(json.dumps(_one(dtype_name, release == "1", args.width, args.out)))
        return
    for case in ("float64:0", "float64:1", "float32:1"):
        command = [sys.executable, __file__, "--one", case, "--width", str(args.width),
                   "--out", str(args.out)]
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
