"""Streaming vs in-memory pruning of the real benchmark model (same plan and perplexity?), full vs local SPSA.

Runs ``minillm prune`` in fresh processes (peak RSS from ``/usr/bin/time -v``), once in memory and once
with ``--streaming --max-memory cpu=CAP`` (a cap that forces most blocks into accelerate's disk
offload), compares the two plans stored in ``minillm.json`` and the perplexity of both exports on the
first ``--windows`` non-overlapping 128-token windows of wiki.test. ``fms-local`` (block-local SPSA,
streaming only) is compared with full-loss ``fms`` the same way. Each heavy step takes the CPU lock.

    python tools/bench_streaming_quality.py --criteria wanda-sp --windows 40    # quick
    python tools/bench_streaming_quality.py --criteria wanda-sp,fms,fms-local --windows 200
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path.home() / ".cache/minillm-bench/smollm2-135m"
TEXT = Path(__file__).resolve().parent.parent.parent / "shared/data/text"
STREAMING_ONLY = {"fms-local"}


def cap_for(criterion: str, caps: str) -> str:
    """``"fms=1.45GiB,*=0.8GiB"`` → the cap of ``criterion`` (``*`` for the others)."""
    table = dict(part.split("=") for part in caps.split(","))
    return table.get(criterion, table["*"])


def _locked(command: list[str], lock: str) -> list[str]:
    return (["flock", lock, "nice", "-n", "5"] if lock else []) + command


def prune(criterion: str, out: Path, streaming: bool, args: argparse.Namespace) -> dict:
    command = [
        "/usr/bin/time",
        "-v",
        "minillm",
        "prune",
        "-m",
        str(args.model),
        "--criterion",
        criterion,
        "--ratio",
        str(args.ratio),
        "--calib",
        str(TEXT / "wiki.train.txt"),
        "--calib-samples",
        str(args.samples),
        "--seq-len",
        "128",
        "--batch-size",
        "8",
        "--spsa-steps",
        str(args.spsa_steps),
        "--out",
        str(out),
        "--overwrite",
        "-q",
    ]
    if streaming:
        command += ["--streaming", "--max-memory", f"cpu={cap_for(criterion, args.cap)}"]
    start = time.perf_counter()
    done = subprocess.run(_locked(command, args.lock), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"prune failed ({criterion}, streaming={streaming}):\n{done.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    metadata = json.loads((out / "minillm.json").read_text())
    return {
        "criterion": criterion,
        "streaming": streaming,
        "seconds": time.perf_counter() - start,
        "peak_rss_gib": peak / 1024**2,
        "plan": metadata["plan"]["layers"],
        "params_after": metadata["params_after"],
    }


def perplexity(folder: Path, args: argparse.Namespace) -> float:
    code = (
        "import sys, json; from minillm.loading import load_model, load_tokenizer;"
        "from minillm.calibration.data import evaluation_windows;"
        "from minillm.evaluate.perplexity import perplexity;"
        f"m = load_model({str(folder)!r}, device_map='cpu'); t = load_tokenizer({str(folder)!r});"
        f"w = evaluation_windows(t, {str(TEXT / 'wiki.test.txt')!r}, 128)[: {args.windows}];"
        "print(json.dumps(perplexity(m, w).perplexity))"
    )
    done = subprocess.run(
        _locked([sys.executable, "-c", code], args.lock),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def overlap(a: list[dict], b: list[dict]) -> float:
    """Fraction of kept channels + heads the two plans share."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        for key in ("heads", "channels"):
            same += len(set(x[key]) & set(y[key]))
            total += len(x[key])
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--criteria", default="wanda-sp,fms,fms-local")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--spsa-steps", type=int, default=4)
    parser.add_argument(
        "--cap",
        default="fms=1.45GiB,*=0.8GiB",
        help="streaming caps per criterion; fms needs room for the LM head and a batch of logits",
    )
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minillm-bench-streaming"))
    parser.add_argument("--lock", default="/tmp/minillm-cpu.lock", help="flock file ('' when already locked)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for criterion in args.criteria.split(","):
        for streaming in (True,) if criterion in STREAMING_ONLY else (False, True):
            out = args.workdir / f"{criterion}-{'stream' if streaming else 'mem'}"
            row = prune(criterion, out, streaming, args)
            row["ppl"] = perplexity(out, args)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    reference = {r["criterion"]: r for r in rows if not r["streaming"]}
    full = next((r for r in rows if r["criterion"] == "fms" and r["streaming"]), None)
    print(
        f"\nperplexity: first {args.windows} windows of 128 tokens of wiki.test; ratio {args.ratio}; "
        f"calibration {args.samples}x128; SPSA steps {args.spsa_steps}\n"
    )
    print(
        "| criterion | mode | perplexity | plan = in-memory plan | kept groups shared with fms (full loss) "
        "| peak RSS (GiB) | time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = reference.get(r["criterion"])
        same = "—" if ref is None or ref is r else ("yes" if ref["plan"] == r["plan"] else "no")
        share = f"{overlap(r['plan'], full['plan']):.1%}" if full is not None else "—"
        mode = f"streaming (cpu={cap_for(r['criterion'], args.cap)})" if r["streaming"] else "in memory"
        print(
            f"| {r['criterion']} | {mode} | {r['ppl']:.3f} | {same} | {share} | {r['peak_rss_gib']:.2f} "
            f"| {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
