"""Benchmark of the pruning axes (issue 17): perplexity and parameters of 20 % models cut along different
axes, one variant per invocation (each run stays under ten minutes on the 2-core box).

    flock /tmp/minillm-bench.lock nice -n 2 python tools/bench_axes.py --label depth \
        --structures layers --out /tmp/axes/depth --json docs/bench/axes.jsonl
    flock /tmp/minillm-bench.lock nice -n 2 python tools/bench_axes.py --label dense \
        --json docs/bench/axes.jsonl
    flock /tmp/minillm-bench.lock nice -n 2 python tools/bench_axes.py --label searched --search \
        --structures attn,mlp,hidden,layers --calib-samples 128 --out /tmp/search \
        --json docs/bench/search.jsonl
    flock /tmp/minillm-bench.lock nice -n 2 python tools/bench_axes.py --label searched-valid --search \
        --structures attn,mlp,hidden,layers --calib-samples 128 --search-data valid --out /tmp/search-valid \
        --json docs/bench/search.jsonl

Calibration: ``--calib-samples`` windows of 128 tokens from wiki.train (seeded); perplexity: the first
``--ppl-windows`` non-overlapping 128-token windows of wiki.test. Every other prune setting is minillm's
default unless given. ``--search-data valid`` ranks the search's candidates on wiki.valid (never on
wiki.test, which reports). The speed of the exports is measured by tools/bench_speed.py (interleaved).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = "/root/.cache/minillm-bench/smollm2-135m"
DATA = Path("/work/shared/data/text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--label", required=True)
    parser.add_argument("--structures", default=None, help="omit for the dense model")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criterion", default=None)
    parser.add_argument("--layer-score", default="influence")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--spsa-steps", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--search", action="store_true", help="prune --search (issue 17)")
    parser.add_argument("--architecture", default=None, help="prune --architecture (what a search chose)")
    parser.add_argument("--dry-run", action="store_true", help="plan (and search) only: no export, no ppl")
    parser.add_argument("--max-candidates", type=int, default=12)
    parser.add_argument("--search-calib-samples", type=int, default=None)
    parser.add_argument("--search-data", default=None,
                        help="prune --search-data: a text file, or valid for wiki.valid (never test)")
    parser.add_argument("--search-data-samples", type=int, default=None)
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--valid", action="store_true",
                        help="also the perplexity of the first --ppl-windows windows of wiki.valid "
                        "(to choose on)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="append one JSON line here")
    args = parser.parse_args()
    if args.search_data and Path(args.search_data).resolve() == (DATA / "wiki.test.txt").resolve():
        parser.error("--search-data: wiki.test reports the perplexity; rank on wiki.valid (valid)")

    import torch

    from minillm.api import count_parameters, prune
    from minillm.calibration.data import evaluation_windows
    from minillm.evaluate.perplexity import perplexity
    from minillm.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    last = {"task": None}

    def progress(task: str, done: int, total: int) -> None:  # a line per stage (and per search candidate)
        if task != last["task"] or task.startswith("search") or done == total:
            print(f"{time.perf_counter() - start:7.1f} s  {task} {done}/{total}", flush=True)
            last["task"] = task

    tokenizer = load_tokenizer(args.model)
    start = time.perf_counter()
    row: dict = {"label": args.label, "structures": args.structures, "ratio": args.ratio}
    if args.structures is None:
        model = load_model(args.model, device_map="cpu", dtype="float32")
        row["params"] = count_parameters(model)
    else:
        kwargs = {"criterion": args.criterion} if args.criterion else {}
        if args.architecture:
            kwargs["architecture"] = args.architecture
        if args.search:
            kwargs.update(search=True, max_candidates=args.max_candidates,
                          search_calib_samples=args.search_calib_samples)
        if args.search_data:
            kwargs.update(search_data=str(DATA / "wiki.valid.txt") if args.search_data == "valid"
                          else args.search_data, search_data_samples=args.search_data_samples)
        result = prune(args.model, ratio=args.ratio, out=args.out, structures=args.structures,
                       layer_score=args.layer_score, round_to=args.round_to, spsa_steps=args.spsa_steps,
                       calib=str(DATA / "wiki.train.txt"), calib_samples=args.calib_samples,
                       device_map="cpu", dtype="float32", overwrite=True, tokenizer=tokenizer,
                       progress=progress, dry_run=args.dry_run, **kwargs)
        model, plan = result.model, result.plan
        config = model.config
        if args.dry_run:  # the model is not cut: report the plan's architecture
            arch = dict(item.split("=") for item in plan.extra.get("architecture", "").split(",") if item)
            config = argparse.Namespace(
                num_hidden_layers=arch.get("layers"), hidden_size=arch.get("hidden"),
                num_attention_heads=arch.get("heads"), num_key_value_heads=arch.get("kv_heads"),
                intermediate_size=arch.get("mlp"))
        row.update(params=plan.params_after, params_before=plan.params_before,
                   achieved_ratio=round(plan.achieved_ratio, 4), prune_seconds=round(result.total_seconds, 1),
                   criterion=plan.extra.get("criterion") if args.structures and
                   {"attn", "mlp"} & set(args.structures.replace("both", "attn,mlp").split(",")) else None,
                   layer_score=args.layer_score if "layers" in args.structures else None,
                   layers=config.num_hidden_layers, hidden=config.hidden_size,
                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                   intermediate=config.intermediate_size, kept_layers=plan.kept_layers, out=args.out,
                   calib_samples=args.calib_samples, architecture=plan.extra.get("architecture"),
                   search=plan.extra.get("search"))
    if not args.dry_run:
        windows = evaluation_windows(tokenizer, str(DATA / "wiki.test.txt"), 128)[: args.ppl_windows]
        row["ppl_wiki_test"] = round(perplexity(model, windows).perplexity, 3)
        row["ppl_windows"] = int(windows.shape[0])
        if args.valid:
            valid = evaluation_windows(tokenizer, str(DATA / "wiki.valid.txt"), 128)[: args.ppl_windows]
            row["ppl_wiki_valid"] = round(perplexity(model, valid).perplexity, 3)
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
