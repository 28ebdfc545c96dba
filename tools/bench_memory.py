"""Peak memory of ``minillm prune --streaming`` vs model size, measured from outside the process.

For each size: write a random-init Llama checkpoint as safetensors shards (tools/make_random_llama.py,
bounded memory), run ``minillm prune --streaming --max-memory cpu=CAP`` under ``/usr/bin/time -v``,
read "Maximum resident set size" (peak RSS of the process, file-backed pages included), then delete
the checkpoint and the export. Each heavy step runs under the shared CPU lock. Results are appended as
JSON lines, then printed as a markdown table and plotted (matplotlib: ``pip install minillm-prune[report]``).

    python tools/bench_memory.py --runs 0.1B:1.6GiB --criterion wanda-sp      # CPU-sized smoke run
    python tools/bench_memory.py --runs 0.5B:1.8GiB,1.5B:2.6GiB,3B:3.6GiB --plot docs/figures/memory.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
TOKENIZER = Path.home() / ".cache/minillm-bench/smollm2-135m"
TEXT = TOOLS.parent.parent / "shared/data/text/wiki.train.txt"


def _locked(command: list[str], lock: str | None) -> list[str]:
    return (["flock", lock, "nice", "-n", "5"] if lock else []) + command


def run_one(size: str, cap: str, args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    ckpt, out = work / f"rand-{size}", work / f"pruned-{size}"
    shutil.rmtree(out, ignore_errors=True)
    if not (ckpt / "config.json").is_file():
        make = [
            sys.executable,
            str(TOOLS / "make_random_llama.py"),
            "--size",
            size,
            "--out",
            str(ckpt),
            "--tokenizer",
            str(args.tokenizer),
            "--shard-size-mb",
            "500",
        ]
        subprocess.run(_locked(make, args.lock), check=True)
    params = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 4
    prune = [
        "/usr/bin/time",
        "-v",
        "minillm",
        "prune",
        "-m",
        str(ckpt),
        "--streaming",
        "--max-memory",
        f"cpu={cap}",
        "--criterion",
        args.criterion,
        "--calib",
        str(args.text),
        "--calib-samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--ratio",
        str(args.ratio),
        "--spsa-steps",
        str(args.spsa_steps),
        "--out",
        str(out),
        "--max-shard-size",
        args.shard,
        "-q",
    ]
    start = time.perf_counter()
    done, split = _run_sampled(_locked(prune, args.lock))
    seconds = time.perf_counter() - start
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    elapsed = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", done.stderr)
    row = {
        "size": size,
        "params": params,
        "model_gib": params * 4 / 1024**3,
        "cap": cap,
        "cap_gib": _cap_gib(cap),
        "criterion": args.criterion,
        "rc": done.returncode,
        "peak_rss_gib": int(peak_kb.group(1)) / 1024**2 if peak_kb else None,
        "elapsed": elapsed.group(1) if elapsed else f"{seconds:.0f}s",
        **split,
        "exported_shards": len(list(out.glob("*.safetensors"))) if out.is_dir() else 0,
        "stderr_tail": done.stderr.strip().splitlines()[-25:] if done.returncode else [],
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return row


def _status_mib(pid: int) -> dict[str, int]:
    """RssAnon / RssFile of ``pid`` now (MiB), or {} once it has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("RssAnon:", "RssFile:")))
    return {f[0].rstrip(":"): int(f[1]) // 1024 for f in fields}


def _minillm_pid(root: int) -> int | None:
    """The ``minillm`` process under ``root`` (/usr/bin/time, possibly flock and nice in between)."""
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
            # the console script itself (python …/bin/minillm); not flock, whose lock file is minillm-*.lock
            if any(Path(a.decode(errors="ignore")).name == "minillm" for a in argv):
                return pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (OSError, IndexError):
            continue
        frontier += [int(c) for c in children]
    return None


def _run_sampled(command: list[str]) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run ``command`` and sample the prune process's anonymous vs file-backed RSS every 0.1 s.

    The peak of their sum is what ``/usr/bin/time`` reports; the split says what the peak is made of:
    anonymous memory (tensors, heap) or file-backed pages (memory-mapped safetensors read in place,
    which the kernel may reclaim under pressure).
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "total": 0}
    at_peak: dict[str, int] = {}
    target = None
    output: dict[str, str] = {}
    reader = threading.Thread(target=lambda: output.update(zip(("out", "err"), process.communicate(),
                                                               strict=True)))
    reader.start()
    while reader.is_alive():
        target = target or _minillm_pid(process.pid)
        now = _status_mib(target) if target else {}
        if now:
            peak["RssAnon"] = max(peak["RssAnon"], now["RssAnon"])
            peak["RssFile"] = max(peak["RssFile"], now["RssFile"])
            if now["RssAnon"] + now["RssFile"] > peak["total"]:
                peak["total"], at_peak = now["RssAnon"] + now["RssFile"], now
        time.sleep(0.1)
    reader.join()
    done = subprocess.CompletedProcess(
        command, process.returncode, output.get("out", ""), output.get("err", "")
    )
    split = {
        "peak_anon_gib": peak["RssAnon"] / 1024,
        "peak_file_gib": peak["RssFile"] / 1024,
        "at_peak_anon_gib": at_peak.get("RssAnon", 0) / 1024,
        "at_peak_file_gib": at_peak.get("RssFile", 0) / 1024,
    }
    return done, split


def _cap_gib(cap: str) -> float:
    match = re.fullmatch(r"([\d.]+)\s*(GiB|MiB|GB|MB)", cap)
    if not match:
        raise SystemExit(f"cap {cap!r}: write it like 3.5GiB or 900MiB")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"GiB": 1.0, "MiB": 1 / 1024, "GB": 1e9 / 1024**3, "MB": 1e6 / 1024**3}[unit]


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | weights (GiB) | --max-memory cpu | model / cap | peak RSS (GiB) | peak / cap "
        "| at the peak: anon + file-backed (GiB) | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_rss_gib"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['model_gib']:.2f} | {r['cap']} | "
            f"{r['model_gib'] / r['cap_gib']:.2f}× | {peak:.2f} | {peak / r['cap_gib']:.2f}× "
            f"| {_split(r)} | {r['elapsed']} |"
            if r["rc"] == 0 and peak
            else f"| {r['size']} | failed (rc {r['rc']}) | | {r['cap']} | | | | | |"
        )
    return "\n".join(lines)


def _split(row: dict) -> str:
    if "at_peak_anon_gib" not in row:
        return "not sampled"
    return f"{row['at_peak_anon_gib']:.2f} + {row['at_peak_file_gib']:.2f}"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install minillm-prune[report]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r["rc"] == 0 and r["peak_rss_gib"]), key=lambda r: r["model_gib"])
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["model_gib"] for r in ok]
    ax.plot(sizes, sizes, "k:", label="model weights")
    ax.plot(sizes, [r["cap_gib"] for r in ok], "s--", label="--max-memory cap")
    ax.plot(sizes, [r["peak_rss_gib"] for r in ok], "o-", label="peak RSS (/usr/bin/time -v)")
    for r in ok:
        ax.annotate(
            r["size"], (r["model_gib"], r["peak_rss_gib"]), textcoords="offset points", xytext=(4, -12)
        )
    ax.set_xlabel("model weights (GiB, float32)")
    ax.set_ylabel("GiB")
    ax.set_title(f"minillm prune --streaming ({ok[0]['criterion'] if ok else ''})")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="size:cap pairs, e.g. 0.1B:1.6GiB,3B:3.6GiB")
    parser.add_argument("--criterion", default="wanda-sp")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--spsa-steps", type=int, default=4)
    parser.add_argument("--shard", default="1GB", help="--max-shard-size of the export")
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--workdir", default="/tmp/minillm-bench-memory")
    parser.add_argument("--lock", default="/tmp/minillm-cpu.lock", help="flock file ('' to run unlocked)")
    parser.add_argument("--results", type=Path, default=Path("/tmp/minillm-bench-memory.jsonl"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--replot", action="store_true", help="Only redraw --plot from the --results file.")
    parser.add_argument("--keep", action="store_true", help="Keep checkpoints and exports.")
    args = parser.parse_args()
    if args.replot:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        print(table(rows))
        plot(rows, args.plot)
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in args.runs.split(","):
        size, cap = pair.split(":")
        row = run_one(size, cap, args)
        rows.append(row)
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
        for line in row["stderr_tail"]:
            print("   ", line, flush=True)
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
