"""Benchmark for issue 16: recovery by distillation vs next-token CE, full-parameter vs LoRA, equal tokens.

From one pruned export, runs ``minillm recover`` four ways at the same token budget (LoRA + CE, today's
default before this issue; full + CE; full + KD; LoRA + KD), then ``minillm eval --ppl`` on every model
(dense and pruned too). Each stage runs under the shared benchmark lock (taken per stage, so other jobs
interleave) inside ``/usr/bin/time``, which records its wall time and peak resident memory (lock wait
excluded). Stages whose output exists are skipped (re-run to resume). Prints the markdown table for
docs/benchmarks.md with the exact commands.

CPU-sized run (what docs/benchmarks.md reports)::

    python tools/bench_distill.py --model $(cat /tmp/benchmodel.txt) --pruned /tmp/kd-bench/pruned \\
        --work /tmp/kd-bench --max-tokens 40960
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

MINILLM = ["python3", "-c", "from minillm.cli import main; main()"]
VARIANTS = {  # name: (method, loss, learning rate); rates fixed in advance, not tuned on any split
    "lora-ce": ("lora", "ce", "2e-4"),
    "full-ce": ("full", "ce", "5e-5"),
    "full-kd": ("full", "kd", "5e-5"),
    "lora-kd": ("lora", "kd", "2e-4"),
    "blocks": ("blocks", "kd", "1e-4"),  # --mode blocks: --block-samples windows, --block-steps per block
}


def run_stage(name: str, command: list[str], work: Path, lock: str) -> dict[str, float]:
    """Run ``command`` under the lock and /usr/bin/time; returns seconds and peak RSS (MiB)."""
    timing = work / f"{name}.time"
    wrapped = ["flock", lock, "/usr/bin/time", "-f", "%e %M", "-o", str(timing), "nice", "-n", "2", *command]
    print(f"[{name}] {shlex.join(command)}", flush=True)
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(wrapped, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds, kib = timing.read_text().split()[-2:]
    stage = {"command": shlex.join(command), "seconds": float(seconds), "peak_mib": int(kib) / 1024}
    stages_file = work / "stages.json"
    stages = json.loads(stages_file.read_text()) if stages_file.is_file() else {}
    stages[name] = stage
    stages_file.write_text(json.dumps(stages, indent=1))
    print(f"[{name}] {stage['seconds']:.0f} s, peak {stage['peak_mib']:.0f} MiB", flush=True)
    return stage


def table(work: Path, variants: list[str]) -> str:
    stages = json.loads((work / "stages.json").read_text())
    header = ["model", "method", "loss", "train tokens", "wiki.test ppl", "train wall (s)", "tokens/s",
              "peak RSS (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ["dense", "pruned", *variants]:
        report = work / f"eval-{name}.json"
        if not report.is_file():
            continue
        ppl = json.loads(report.read_text())["perplexity"]["perplexity"]
        if name in ("dense", "pruned"):
            lines.append(f"| {name} | – | – | – | {ppl:.2f} | – | – | – |")
            continue
        recovery = json.loads((work / name / "minillm.json").read_text())["recovery"]
        train = recovery["train"]
        stage = stages[f"train-{name}"]
        cells = [name, recovery["method"], recovery["loss"], f"{train['tokens']:,}", f"{ppl:.2f}",
                 f"{stage['seconds']:.0f}", f"{train['tokens'] / train['seconds']:.0f}",
                 f"{stage['peak_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", required=True, help="The dense model (also the KD teacher).")
    parser.add_argument("--pruned", required=True, help="A pruned export of --model.")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--train", default="/work/shared/data/text/wiki.train.txt")
    parser.add_argument("--test", default="/work/shared/data/text/wiki.test.txt")
    parser.add_argument("--max-tokens", type=int, default=40960)
    parser.add_argument("--block-steps", type=int, default=50)
    parser.add_argument("--variants", default="lora-ce,full-ce,full-kd,lora-kd")
    parser.add_argument("--lock", default="/tmp/minillm-bench.lock")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    plan: list[tuple[str, list[str], Path]] = []
    for name, model in (("dense", args.model), ("pruned", args.pruned)):
        plan.append((f"eval-{name}", [*MINILLM, "eval", model, "--ppl", args.test, "--device-map", "cpu",
                                      "--json", str(work / f"eval-{name}.json")], work / f"eval-{name}.json"))
    for name in variants:
        method, loss, lr = VARIANTS[name]
        train = [*MINILLM, "recover", args.pruned, "--data", args.train, "--out", str(work / name),
                 "--loss", loss, "--lr", lr, "--max-length", "128", "--batch-size", "8"]
        if method == "blocks":
            train += ["--mode", "blocks", "--block-steps", str(args.block_steps), "--block-samples", "32"]
        else:
            train += ["--method", method, "--max-tokens", str(args.max_tokens), "--grad-accum", "1",
                      "--val-size", "32", "--eval-every", "0", "--save-every", "0", "--dropout", "0"]
        if loss != "ce":
            train += ["--teacher", args.model]
        plan.append((f"train-{name}", train, work / name))
        evaluate = [*MINILLM, "eval", str(work / name), "--ppl", args.test, "--device-map", "cpu",
                    "--json", str(work / f"eval-{name}.json")]
        plan.append((f"eval-{name}", evaluate, work / f"eval-{name}.json"))
    for name, command, output in plan:
        if output.exists():
            print(f"[{name}] {output} exists: skipped", flush=True)
            continue
        run_stage(name, command, work, args.lock)
    result = table(work, list(VARIANTS))  # every variant measured in this work folder so far
    (work / "table.md").write_text(result + "\n")
    print(result)
    for name, stage in json.loads((work / "stages.json").read_text()).items():
        print(f"{name}: {stage['seconds']:.0f} s, {stage['peak_mib']:.0f} MiB  {stage['command']}")


if __name__ == "__main__":
    main()
