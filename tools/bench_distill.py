"""Benchmark for issue 16: recovery by distillation vs next-token CE, full-parameter vs LoRA, equal tokens.

From one pruned export, runs ``minillm recover`` four ways at the same token budget (LoRA + CE, today's
default before this issue; full + CE; full + KD; LoRA + KD), then ``minillm eval --ppl`` on every model
(dense and pruned too). Each variant's training and evaluation run in one hold of the shared benchmark
lock (the references in another, so other jobs interleave between holds), each command inside
``/usr/bin/time``, which records its wall time and peak resident memory (lock wait excluded), and
``timeout`` (600 s per hold in all). Stages whose output exists are skipped (re-run to resume). Prints
the markdown table for docs/benchmarks.md with the exact commands.

CPU-sized run (what docs/benchmarks.md reports)::

    python tools/bench_distill.py --model $(cat /tmp/benchmodel.txt) --pruned /tmp/kd-bench/pruned \\
        --work /tmp/kd-bench --max-tokens 8192 --test-windows 64
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

from bench_recover import cpu_lock  # tools/ is on sys.path when run as a script

MINILLM = ["python3", "-c", "from minillm.cli import main; main()"]
VARIANTS = {  # name: (method, loss, learning rate); rates fixed in advance, not tuned on any split
    "lora-ce": ("lora", "ce", "2e-4"),
    "full-ce": ("full", "ce", "5e-5"),
    "full-kd": ("full", "kd", "5e-5"),
    "lora-kd": ("lora", "kd", "2e-4"),
    "blocks": ("blocks", "kd", "1e-4"),  # --mode blocks: --block-samples windows, --block-steps per block
}


def test_head(test: str, model: str, windows: int, seq_len: int, out: Path) -> Path:
    """The first ``windows`` × ``seq_len`` tokens of the test text (whole lines), so one evaluation fits
    the CPU budget; ``minillm eval`` then scores every window of it."""
    from transformers import AutoTokenizer

    if out.is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(model)
    lines, count = [], 0
    for line in Path(test).read_text().splitlines(keepends=True):
        lines.append(line)
        count += len(tokenizer(line, add_special_tokens=False)["input_ids"])
        if count > windows * seq_len + seq_len // 2:
            break
    out.write_text("".join(lines))
    return out


def run_stage(name: str, command: list[str], work: Path, limit: int) -> dict[str, float]:
    """Run ``command`` under /usr/bin/time (the caller holds the lock), killed after ``limit`` seconds;
    returns seconds and peak RSS (MiB)."""
    timing = work / f"{name}.time"
    wrapped = ["/usr/bin/time", "-f", "%e %M", "-o", str(timing), "timeout", str(limit),
               "nice", "-n", "2", *command]
    print(f"[{name}] {shlex.join(command)}", flush=True)
    with open(work / f"{name}.log", "w") as log:
        code = subprocess.run(wrapped, check=False, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds, kib = timing.read_text().split()[-2:]
    stage = {"command": shlex.join(command), "seconds": float(seconds), "peak_mib": int(kib) / 1024,
             "returncode": code}
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
        if not (work / name / "minillm.json").is_file():
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
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--test-windows", type=int, default=64, help="128-token windows of --test scored.")
    parser.add_argument("--block-steps", type=int, default=50)
    parser.add_argument("--variants", default="full-kd,lora-ce,full-ce,lora-kd")
    parser.add_argument("--lock", default="/tmp/minillm-bench.lock")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    test = str(test_head(args.test, args.model, args.test_windows, 128, work / "test-head.txt"))
    plan: list[tuple[str, list[str], Path]] = []
    for name in variants:
        method, loss, lr = VARIANTS[name]
        train = [*MINILLM, "recover", args.pruned, "--data", args.train, "--out", str(work / name),
                 "--loss", loss, "--lr", lr, "--max-length", "128", "--batch-size", "8"]
        if method == "blocks":
            train += ["--mode", "blocks", "--block-steps", str(args.block_steps), "--block-samples", "32"]
        else:
            train += ["--method", method, "--max-tokens", str(args.max_tokens), "--grad-accum", "1",
                      "--val-size", "0", "--eval-every", "0", "--save-every", "0", "--dropout", "0"]
        if loss != "ce":
            train += ["--teacher", args.model]
        plan.append((f"train-{name}", train, work / name))
        evaluate = [*MINILLM, "eval", str(work / name), "--ppl", test, "--device-map", "cpu",
                    "--json", str(work / f"eval-{name}.json")]
        plan.append((f"eval-{name}", evaluate, work / f"eval-{name}.json"))
    # the references last: a run cut short by the clock still has the comparisons that matter
    for name, model in (("dense", args.model), ("pruned", args.pruned)):
        plan.append((f"eval-{name}", [*MINILLM, "eval", model, "--ppl", test, "--device-map", "cpu",
                                      "--json", str(work / f"eval-{name}.json")], work / f"eval-{name}.json"))
    # one lock hold per variant (train then eval) and one for the references: fewer waits on a busy box,
    # each hold at most 600 s in all (the eval gets what the training left, at least 240 s)
    groups: list[list[tuple[str, list[str], Path]]] = [plan[i : i + 2] for i in range(0, len(plan), 2)]
    for group in groups:
        todo = [stage for stage in group if not stage[2].exists()]
        for name, _, output in group:
            if output.exists():
                print(f"[{name}] {output} exists: skipped", flush=True)
        if not todo:
            continue
        with cpu_lock(args.lock):  # bench_recover's lock: one hold per variant (train + eval)
            start = time.monotonic()
            for name, command, _ in todo:
                if name.startswith("eval-") and command[4] != args.model and not Path(command[4]).is_dir():
                    print(f"[{name}] no model (its training failed): skipped", flush=True)
                    continue
                limit = 600 if name.startswith("train-") else max(240, int(600 - (time.monotonic() - start)))
                run_stage(name, command, work, limit)
    result = table(work, list(VARIANTS))  # every variant measured in this work folder so far
    (work / "table.md").write_text(result + "\n")
    print(result)
    for name, stage in json.loads((work / "stages.json").read_text()).items():
        print(f"{name}: {stage['seconds']:.0f} s, {stage['peak_mib']:.0f} MiB  {stage['command']}")


if __name__ == "__main__":
    main()
