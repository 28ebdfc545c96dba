"""Benchmark of pruning across families: perplexity (BOS in every window) of a dense model or an export.

Run each measurement separately (each well under 10 minutes on the 2-core box), under the benchmark lock:

    M=~/.cache/minillm-bench/gemma3-270m     # ../shared/tools/get-gemma3 $M
    flock /tmp/minillm-bench.lock nice -n 2 python -m minillm.cli prune --model $M --ratio 0.1 \
        --calib ../shared/data/text/wiki.train.txt --out /tmp/g3-10
    flock /tmp/minillm-bench.lock nice -n 2 python tools/bench_families.py --model /tmp/g3-10 \
        --test ../shared/data/text/wiki.test.txt --seq-len 512 --windows 24 --json docs/bench/families.json

Perplexity protocol: the test text is tokenised as one stream without special tokens, cut into
consecutive windows of ``seq_len - 1`` tokens, and every window gets the tokenizer's BOS in front
(Gemma's perplexity is 2-3x worse without it); exp(mean NLL) over the ``seq_len - 1`` real tokens of
each window, no context carried. The first ``--windows`` windows are used (the same for every model,
since both models share one tokenizer per family). The model is loaded with vanilla
``from_pretrained`` (``trust_remote_code=False``) unless the export carries ``modeling_minillm.py`` (its
config cannot express the widths), which the row then records.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def bos_windows(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` windows of BOS + ``seq_len - 1`` consecutive tokens of the stream."""
    from minillm.calibration.data import consecutive_windows, tokenize

    windows = consecutive_windows(tokenize(tokenizer, text), seq_len, tokenizer.bos_token_id)
    if windows.shape[0] < count:
        raise SystemExit(f"the text gives {windows.shape[0]} windows of {seq_len - 1} tokens, fewer than "
                         f"--windows {count}")
    return windows[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF folder (dense model or minillm export).")
    parser.add_argument("--test", required=True, help="Test text (wiki.test.txt).")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--label", default=None, help="Row name in the JSON (default: the folder name).")
    parser.add_argument("--json", default=None, help="Append the result to this JSON list file.")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.evaluate.perplexity import perplexity
    from minillm.export import REMOTE_CODE_FILE, read_metadata

    folder = Path(args.model).expanduser()
    start = time.perf_counter()
    vanilla = not (folder / REMOTE_CODE_FILE).exists()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=not vanilla, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = bos_windows(tokenizer, Path(args.test).read_text(), args.seq_len, args.windows)
    result = perplexity(model, windows, args.batch_size)
    metadata = read_metadata(folder)
    row = {
        "label": args.label or folder.name,
        "model_type": model.config.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "achieved_ratio": metadata.get("achieved_ratio"),
        "layer_widths": sorted({(w["heads"], w["kv_heads"], w["channels"])
                                for w in metadata.get("layer_widths") or []}),
        "ppl_bos": round(result.perplexity, 3),
        "protocol": f"BOS + {args.seq_len - 1} tokens per window; " + result.protocol,
        "vanilla_from_pretrained": vanilla,
        "command": metadata.get("command"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(row))
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
