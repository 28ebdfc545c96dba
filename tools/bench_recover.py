"""Benchmark for issue 4: dense vs pruned vs LoRA-recovered, perplexity and the seven zero-shot tasks.

Runs the user-facing commands (``minillm prune`` / ``eval`` / ``recover``) one after another, each
under the shared CPU lock (taken per stage, so other jobs can interleave; the recorded seconds exclude
the wait), skips stages whose output already exists (re-run to resume), and prints the markdown table
for docs/benchmarks.md with the exact commands.

CPU-sized run (what docs/benchmarks.md reports)::

    python tools/bench_recover.py --model /root/.cache/minillm-bench/smollm2-135m --work /tmp/bench-recover \\
        --limit 200 --recover-args "--max-steps 80 --batch-size 8 --grad-accum 1 --max-length 128 --lr 2e-4"
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TASKS = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


@contextmanager
def cpu_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_stage(name: str, command: list[str], work: Path, lock: str | None) -> float:
    """Run one command under the lock at nice 5; its seconds (lock wait excluded) go to stages.json."""
    stages_file = work / "stages.json"
    stages = json.loads(stages_file.read_text()) if stages_file.is_file() else {}
    print(f"[{name}] {shlex.join(command)}", flush=True)
    with cpu_lock(lock):
        start = time.perf_counter()
        with open(work / f"{name}.log", "w") as log:
            subprocess.run(["nice", "-n", "5", *command], check=True, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    stages[name] = {"command": shlex.join(command), "seconds": round(seconds, 1)}
    stages_file.write_text(json.dumps(stages, indent=1))
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


def eval_command(model: str, out: Path, args: argparse.Namespace) -> list[str]:
    return ["minillm", "eval", model, "--ppl", args.test, "--tasks", TASKS, "--data-dir", args.zeroshot,
            "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--json", str(out)]


def table(work: Path, args: argparse.Namespace) -> str:
    """Markdown: one row per model, perplexity, each task's headline metric, mean, retained mean."""
    reports = {name: json.loads((work / f"{name}.json").read_text())
               for name in ("dense", "pruned", "recovered") if (work / f"{name}.json").is_file()}
    if "dense" not in reports:
        return "(dense evaluation missing)"
    tasks = list(reports["dense"]["zeroshot"]["tasks"])
    metrics = [reports["dense"]["zeroshot"]["tasks"][t]["metric"] for t in tasks]
    header = ("| model | params | wiki ppl | "
              + " | ".join(f"{TASK_LABELS.get(t, t)} ({m})" for t, m in zip(tasks, metrics, strict=True))
              + " | mean | retained |")
    lines = [header, "|" + "---|" * (len(tasks) + 5)]
    dense_mean = reports["dense"]["zeroshot"]["mean"]
    for name, report in reports.items():
        scores = report["zeroshot"]["tasks"]
        cells = [f"{scores[t]['value']:.3f}" for t in tasks]
        mean = report["zeroshot"]["mean"]
        lines.append(f"| {name} | {report['params'] / 1e6:.1f}M | {report['perplexity']['perplexity']:.2f} | "
                     + " | ".join(cells) + f" | {mean:.4f} | {mean / dense_mean:.1%} |")
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--calib", default="/work/shared/data/text/wiki.train.txt")
    parser.add_argument("--train", default="/work/shared/data/text/wiki.train.txt")
    parser.add_argument("--test", default="/work/shared/data/text/wiki.test.txt")
    parser.add_argument("--zeroshot", default="/work/shared/data/zeroshot")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prune-args", default="--ratio 0.2 --criterion fms")
    parser.add_argument("--recover-args",
                        default="--max-steps 80 --batch-size 8 --grad-accum 1 --max-length 128 --lr 2e-4")
    parser.add_argument("--lock", default="/tmp/minillm-cpu.lock", help="'' to run without the shared lock")
    parser.add_argument("--stages", default="prune,dense,pruned,recover,recovered")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pruned, recovered = work / "pruned-model", work / "recovered-model"
    plan: dict[str, tuple[list[str], Path]] = {
        "prune": (["minillm", "prune", "--model", args.model, *shlex.split(args.prune_args),
                   "--calib", args.calib, "--out", str(pruned)], pruned),
        "dense": (eval_command(args.model, work / "dense.json", args), work / "dense.json"),
        "pruned": (eval_command(str(pruned), work / "pruned.json", args), work / "pruned.json"),
        "recover": (["minillm", "recover", str(pruned), "--data", args.train, "--out", str(recovered),
                     *shlex.split(args.recover_args)], recovered),
        "recovered": (eval_command(str(recovered), work / "recovered.json", args), work / "recovered.json"),
    }
    for stage in args.stages.split(","):
        command, output = plan[stage]
        if output.exists():
            print(f"[{stage}] {output} exists: skipped", flush=True)
            continue
        run_stage(stage, command, work, args.lock or None)
    result = table(work, args)
    (work / "table.md").write_text(result + "\n")
    print(result)
    stages_file = work / "stages.json"
    stages: dict[str, Any] = json.loads(stages_file.read_text()) if stages_file.is_file() else {}
    for name, stage in stages.items():
        print(f"{name}: {stage['seconds']} s  {stage['command']}")
    sys.exit(0)


if __name__ == "__main__":
    main()
