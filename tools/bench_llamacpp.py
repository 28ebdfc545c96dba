"""minillm's uniform exports in llama.cpp (issue 17): do they convert, is their perplexity there the same as
in transformers, and how fast are the pruned models there compared with the dense one?

Why a separate runtime: a uniform export is a stock ``LlamaConfig`` so that every downstream tool loads it;
llama.cpp is the common CPU runtime, with its own converter and kernels, so "it converts, computes the same
function and is faster there" is the claim that matters to users who deploy with it.

What it does, all from the registry's source distribution of ``llama-cpp-python`` (which vendors llama.cpp):
1. builds the sdist into a CPU wheel once (``nice -n 10``; cached under ``--cache``) and installs it;
2. converts every HF folder with the vendored ``convert_hf_to_gguf.py`` (its own ``gguf-py``), per outtype;
3. perplexity on the same token windows in both runtimes: the first ``--ppl-windows`` non-overlapping
   128-token windows of wiki.test, tokenised by the HF tokenizer with minillm's own helper
   (``evaluation_windows``: one stream, a leading BOS where the tokenizer has one, no context carried);
   llama.cpp evaluates exactly those ids (no BOS added) and the mean NLL is computed here;
4. prefill and greedy-decode tokens/s at batch 1, models alternated every repeat, medians and latency
   ratios in the format of tools/bench_speed.py (``minillm.speed``).

    flock /tmp/minillm-bench.lock nice -n 2 python tools/bench_llamacpp.py \\
        --dense /root/.cache/minillm-bench/smollm2-135m \\
        --pruned width=/tmp/llamacpp/width --pruned depth=/tmp/llamacpp/depth --json docs/bench/llamacpp.jsonl

CPU-sized smoke run: ``--ppl-windows 4 --prompt-lens 16 --new-tokens 4 --repeats 1 --outtypes f32``.
Not part of the test suite (it builds C++ for many minutes and reads the benchmark model).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path.home() / ".cache/minillm-bench/llamacpp"
WIKI_TEST = "/work/shared/data/text/wiki.test.txt"
#: CPU-only build; no tests or examples (only the shared libraries the Python binding loads)
CMAKE_ARGS = ("-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF")
#: the converter imports sentencepiece even for BPE vocabularies (pin of its requirements-convert_*.txt)
CONVERTER_DEPS = {"sentencepiece": "sentencepiece>=0.1.98,<0.3.0"}


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, **kwargs)


def ensure_llama_cpp(cache: Path) -> tuple[str, Path]:
    """Build (once) and install llama-cpp-python from the registry's sdist; (version, vendored llama.cpp)."""
    sdists = sorted(glob.glob(str(cache / "sdist/llama_cpp_python-*.tar.gz")))
    if not sdists:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "llama-cpp-python", "-d", str(cache / "sdist")], check=True)
        sdists = sorted(glob.glob(str(cache / "sdist/llama_cpp_python-*.tar.gz")))
    sdist = Path(sdists[-1])
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    wheels = glob.glob(str(cache / f"wheels/llama_cpp_python-{version}-*.whl"))
    if not wheels:
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        _run(["nice", "-n", "10", sys.executable, "-m", "pip", "wheel", "--no-deps",
              "-w", str(cache / "wheels"), str(sdist)], check=True, env=env)
        wheels = glob.glob(str(cache / f"wheels/llama_cpp_python-{version}-*.whl"))
    try:
        import llama_cpp

        installed = llama_cpp.__version__
    except ImportError:
        installed = None
    if installed != version:  # its runtime dependencies (numpy, jinja2, diskcache) come from the registry
        _run([sys.executable, "-m", "pip", "install", wheels[0]], check=True)
    missing = [spec for module, spec in CONVERTER_DEPS.items() if importlib.util.find_spec(module) is None]
    if missing:
        _run([sys.executable, "-m", "pip", "install", *missing], check=True)
    source = cache / "src" / sdist.name.removesuffix(".tar.gz")
    if not source.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(cache / "src", filter="data")
    return version, source / "vendor/llama.cpp"


def unpacked_llama_cpp(cache: Path = CACHE) -> Path | None:
    """The vendored llama.cpp of an sdist already unpacked by :func:`ensure_llama_cpp` (newest), else None."""
    found = sorted(glob.glob(str(cache / "src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py")))
    return Path(found[-1]).parent if found else None


def fresh(folder: str, outfile: Path) -> bool:
    return outfile.exists() and outfile.stat().st_mtime > Path(folder, "config.json").stat().st_mtime


def convert(folder: str, outfile: Path, outtype: str, llama_dir: Path) -> str | None:
    """llama.cpp's own converter (with its vendored gguf-py); None on success, else its last error line.

    A GGUF newer than the folder's config.json is reused (its ``convert_seconds`` is then None)."""
    if fresh(folder, outfile):
        return None
    outfile.unlink(missing_ok=True)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    done = _run([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), folder, "--outfile", str(outfile),
                 "--outtype", outtype], capture_output=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        print(done.stderr[-3000:], file=sys.stderr)
        return lines[-1] if lines else f"exit status {done.returncode}"
    return None


def llama(path: Path, n_ctx: int, threads: int, logits_all: bool) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def llama_perplexity(path: Path, windows: np.ndarray, threads: int) -> float:
    """exp(mean NLL) over every predicted token of every window, windows evaluated independently."""
    model = llama(path, windows.shape[1], threads, logits_all=True)
    nll, count = 0.0, 0
    for window in windows:
        model.reset()
        model.eval(window.tolist())
        logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    del model
    return math.exp(nll / count)


def hf_model(folder: str) -> Any:
    from minillm.loading import load_model

    return load_model(folder, device_map="cpu", dtype="float32")


def _last_token_argmax(model: Any) -> int:
    logits = np.ctypeslib.as_array(model._ctx.get_logits_ith(-1), shape=(model.n_vocab(),))
    return int(logits.argmax())


def speed(paths: dict[str, Path], params: dict[str, int], prompt_lens: list[int], new_tokens: int,
          repeats: int, warmup: int, threads: int, vocab: int) -> list[Any]:
    """minillm.speed's protocol in llama.cpp: per repeat every case on every model, model order alternating.

    Prefill = one ``eval`` of the prompt (fills the KV cache, logits of the last position only); decode =
    ``new_tokens`` greedy one-token ``eval`` steps on that cache. Prompts are seeded random ids.
    """
    import statistics

    import torch

    from minillm.speed import SpeedRow

    models = {name: llama(path, max(prompt_lens) + new_tokens, threads, logits_all=False)
              for name, path in paths.items()}
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(vocab, (n,), generator=generator).tolist() for n in prompt_lens}
    times: dict[tuple[str, int], list[tuple[float, float]]] = {
        (m, n): [] for m in models for n in prompt_lens}
    names = list(models)
    for r in range(warmup + repeats):
        for n in prompt_lens:
            for name in names if r % 2 == 0 else names[::-1]:
                model = models[name]
                model.reset()
                start = time.perf_counter()
                model.eval(prompts[n])
                token = _last_token_argmax(model)
                middle = time.perf_counter()
                for _ in range(new_tokens):
                    model.eval([token])
                    token = _last_token_argmax(model)
                end = time.perf_counter()
                if r >= warmup:
                    times[(name, n)].append((middle - start, end - middle))
        print(f"speed: repeat {r + 1}/{warmup + repeats}", flush=True)
    rows = []
    for name, path in paths.items():
        for n in prompt_lens:
            pre, dec = zip(*times[(name, n)], strict=True)
            rows.append(SpeedRow(name, 1, n, new_tokens, statistics.median(pre), statistics.median(dec), None,
                                 params[name], path.stat().st_size, repeats, list(pre), list(dec)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True)
    parser.add_argument("--pruned", action="append", default=[], help="label=folder (repeatable)")
    parser.add_argument("--outtypes", default="f32,f16", help="converter outtypes converted and evaluated")
    parser.add_argument("--speed-outtype", default="f32", help="the outtype timed (the exports are float32)")
    parser.add_argument("--gguf-dir", default="/tmp/llamacpp/gguf")
    parser.add_argument("--cache", default=str(CACHE), help="sdist, wheel and unpacked source")
    parser.add_argument("--text", default=WIKI_TEST)
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--prompt-lens", default="64,256")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPUs pinned; threads for perplexity")
    parser.add_argument("--speed-threads", default="2,1", help="llama.cpp thread counts timed (comma list)")
    parser.add_argument("--json", default=None, help="append one JSON line per result here")
    args = parser.parse_args()

    version, llama_dir = ensure_llama_cpp(Path(args.cache))
    from minillm.calibration.data import evaluation_windows
    from minillm.evaluate.perplexity import perplexity
    from minillm.loading import load_tokenizer
    from minillm.speed import markdown, parse_ints, pin_threads, ratios

    threads, cpus = pin_threads(args.threads)
    folders = {"dense": args.dense, **dict(spec.split("=", 1) for spec in args.pruned)}
    windows = evaluation_windows(load_tokenizer(args.dense), args.text, 128)[: args.ppl_windows]
    common = {"llama_cpp_python": version, "threads": threads, "cpus": cpus,
              "ppl_windows": int(windows.shape[0]), "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    results: list[dict[str, Any]] = []
    params: dict[str, int] = {}
    speed_paths: dict[str, Path] = {}
    for name, folder in folders.items():
        model = hf_model(folder)
        params[name] = sum(p.numel() for p in model.parameters())
        ppl_hf = perplexity(model, windows).perplexity
        vocab = int(model.config.vocab_size)
        del model
        for outtype in args.outtypes.split(","):
            gguf = Path(args.gguf_dir) / f"{name}-{outtype}.gguf"
            start, reused = time.perf_counter(), fresh(folder, gguf)
            error = convert(folder, gguf, outtype, llama_dir)
            row = {"kind": "conversion", "model": name, "folder": folder, "outtype": outtype,
                   "converted": error is None, "error": error, "ppl_hf": round(ppl_hf, 4),
                   "convert_seconds": None if reused else round(time.perf_counter() - start, 1)}
            if error is None:
                ppl = llama_perplexity(gguf, windows.numpy(), threads)
                row.update(gguf_bytes=gguf.stat().st_size, ppl_llamacpp=round(ppl, 4),
                           ppl_relative_difference=round(ppl / ppl_hf - 1, 6))
                if outtype == args.speed_outtype:
                    speed_paths[name] = gguf
            print(json.dumps(row), flush=True)
            results.append({**row, **common})
    tables: dict[int, list[Any]] = {}
    if "dense" in speed_paths and len(speed_paths) > 1:
        for count in parse_ints(args.speed_threads, "--speed-threads"):
            rows = tables[count] = speed(speed_paths, params, parse_ints(args.prompt_lens, "--prompt-lens"),
                                         args.new_tokens, args.repeats, args.warmup, count, vocab)
            by_case = {(r["model"], r["prompt_len"]): r for r in ratios(rows, "dense")}
            for r in rows:
                results.append({"kind": "speed", "outtype": args.speed_outtype, **r.to_dict(),
                                **by_case.get((r.model, r.prompt_len), {}), **common, "threads": count})
    print("\n| model | outtype | converts | GGUF MiB | ppl transformers | ppl llama.cpp | difference |")
    print("|---|---|---|---|---|---|---|")
    for r in (x for x in results if x["kind"] == "conversion"):
        if r["converted"]:
            diff = 100 * r["ppl_relative_difference"]
            print(f"| {r['model']} | {r['outtype']} | yes | {r['gguf_bytes'] / 2**20:.0f} | "
                  f"{r['ppl_hf']:.3f} | {r['ppl_llamacpp']:.3f} | {diff:+.3f} % |")
        else:
            print(f"| {r['model']} | {r['outtype']} | **no**: {r['error']} | | {r['ppl_hf']:.3f} | | |")
    for count, rows in tables.items():
        print(f"\nllama-cpp-python {version} (CPU build), {args.speed_outtype} GGUF, {count} threads "
              f"(process pinned to CPUs {cpus}), batch 1, median of {args.repeats} interleaved repeats "
              f"(+{args.warmup} warm-up)\n")
        print(markdown(rows, "dense"))
    if args.json:
        with open(args.json, "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
