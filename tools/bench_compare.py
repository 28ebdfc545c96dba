"""The criteria benchmark of issues 3 and 9: ``minillm compare`` on the benchmark model, plus target checks.

Runs the compare matrix (or reads a finished ``compare.json``) and prints the markdown table followed by
the targets of the issues, each marked met / missed with its numbers:

* fms perplexity ≤ taylor's and ≤ 0.9 × the best gradient-free criterion's (flap, wanda-sp, magnitude);
* fms peak scoring memory ≤ 1.15 × a plain forward pass; taylor's reported;
* taylor-gate perplexity ≤ taylor's; taylor-gate peak scoring memory ≤ 1.2 × a plain forward pass;
  the same two for taylor-lowmem (LLM-Pruner's scores from block-local back-propagation).

CPU-sized run (perplexity on the first 64 windows of wiki.test; say so when quoting it):

    flock /tmp/minillm-cpu.lock nice -n 5 python tools/bench_compare.py \\
        --model ~/.cache/minillm-bench/smollm2-135m --calib ../shared/data/text/wiki.train.txt \\
        --eval-ppl ../shared/data/text/wiki.test.txt --eval-windows 64 --ratios 0.2 --out /tmp/compare-020

    python tools/bench_compare.py --from-json /tmp/compare-020/compare.json   # targets of a finished run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = "fms,fms-gate,taylor,taylor-gate,taylor-lowmem,fms-bp,flap,wanda-sp,magnitude,random"
GRADIENT_FREE = ("flap", "wanda-sp", "magnitude", "magnitude-l2")


def targets(data: dict) -> list[str]:
    """One line per target and (ratio, allocation), from the rows of a compare.json."""
    rows = data["rows"]
    forward = data["forward_peak_bytes"]
    lines = []
    keys = sorted({(r["ratio"], r["allocation"]) for r in rows})
    for ratio, allocation in keys:
        at = {r["method"]: r for r in rows if (r["ratio"], r["allocation"]) == (ratio, allocation)}
        tag = f"ratio {ratio:g} {allocation}"

        def ppl(name: str, at: dict = at) -> float | None:
            return at[name]["perplexity"] if name in at else None

        free = [(ppl(m), m) for m in GRADIENT_FREE if ppl(m) is not None]
        if "fms" in at and "taylor" in at:
            ok = ppl("fms") <= ppl("taylor")
            lines.append(
                f"{tag}: fms ppl {ppl('fms'):.2f} ≤ taylor {ppl('taylor'):.2f}: {'met' if ok else 'MISSED'}"
            )
        if "fms" in at and free:
            best, name = min(free)
            ok = ppl("fms") <= 0.9 * best
            lines.append(
                f"{tag}: fms ppl {ppl('fms'):.2f} ≤ 0.9 × best gradient-free ({name} {best:.2f} → "
                f"{0.9 * best:.2f}): {'met' if ok else 'MISSED'}"
            )
        for exact in ("taylor-gate", "taylor-lowmem"):
            if exact in at and "taylor" in at:
                ok = ppl(exact) <= ppl("taylor")
                lines.append(
                    f"{tag}: {exact} ppl {ppl(exact):.2f} ≤ taylor {ppl('taylor'):.2f}: "
                    f"{'met' if ok else 'MISSED'}"
                )
    first = {r["method"]: r for r in rows}
    for name, bound in (
        ("fms", 1.15), ("taylor-gate", 1.2), ("taylor-lowmem", 1.2), ("taylor", None), ("fms-gate", None)
    ):
        if name in first and forward:
            ratio = first[name]["peak_bytes"] / forward
            verdict = "" if bound is None else (": met" if ratio <= bound else ": MISSED")
            limit = "" if bound is None else f" ≤ {bound}"
            lines.append(f"{name} peak scoring memory {ratio:.2f} × forward{limit}{verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from-json", help="only check the targets of a finished compare.json")
    parser.add_argument("--plot", help="with --from-json: redraw its perplexity-vs-ratio PNG here")
    parser.add_argument("--model")
    parser.add_argument("--calib")
    parser.add_argument("--eval-ppl")
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--allocations", default="uniform,global")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--spsa-steps", type=int, default=16)
    parser.add_argument("--out", default="/tmp/minillm-compare")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        print("\n".join(targets(data)))
        if args.plot:
            from minillm.compare import CompareResult
            from minillm.compare.report import plot

            plot(CompareResult.from_dict(data), Path(args.plot))
        return
    from minillm.compare import compare
    from minillm.compare.report import markdown_table

    result = compare(
        args.model,
        methods=args.methods.split(","),
        ratios=[float(r) for r in args.ratios.split(",")],
        allocations=args.allocations.split(","),
        calib=args.calib,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        eval_ppl=args.eval_ppl,
        eval_windows=args.eval_windows,
        spsa_steps=args.spsa_steps,
        out_dir=args.out,
    )
    print(markdown_table(result))
    print("\n".join(targets(json.loads((Path(args.out) / "compare.json").read_text()))))


if __name__ == "__main__":
    main()
