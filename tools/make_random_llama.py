"""Write a randomly initialised Llama-architecture checkpoint as safetensors shards, in bounded memory.

Why: the memory benchmark needs checkpoints larger than the memory cap (up to 3B float32 = 12 GB) on a
24 GB machine, so the model is never built. A weightless (meta) model gives the tensor names, shapes
and tie structure; each matrix is then filled from a seeded pool of N(0, 0.02²) draws (norm weights are
ones, like ``LlamaPreTrainedModel._init_weights``) and appended to the current shard, which is flushed
at ``--shard-size``. Values are only there to be pruned and measured, not to be a good model.
Peak memory ≈ one shard. The tokenizer is copied from ``--tokenizer``.

    python tools/make_random_llama.py --size 0.1B --out /tmp/rand-0.1b --tokenizer DIR  # e.g.
    (DIR = ~/.cache/minillm-bench/smollm2-135m, the benchmark model, whose vocabulary is 49152)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

#: name → (hidden, layers, heads, kv heads, intermediate); vocab 49152 (the benchmark tokenizer's)
SIZES = {
    "0.1B": (768, 12, 12, 4, 2048),
    "0.5B": (1024, 24, 16, 8, 2816),
    "1.5B": (2048, 24, 16, 8, 5632),
    "3B": (2560, 32, 20, 10, 6912),
    # depth sweep at a fixed width (peak memory should not grow with depth)
    "d8": (1024, 8, 16, 8, 2816),
    "d16": (1024, 16, 16, 8, 2816),
    "d32": (1024, 32, 16, 8, 2816),
}


#: Normal draws shared by all tensors: each tensor copies a window of this pool at a seeded offset, so
#: writing 3B parameters costs a memcpy per tensor instead of 3B fresh draws on a 2-core box.
POOL = 1 << 24


def _draw(pool: torch.Tensor, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape).view(-1)
    start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
    done = 0
    while done < out.numel():
        take = min(pool.numel() - start, out.numel() - done)
        out[done : done + take] = pool[start : start + take]
        done, start = done + take, 0
    return out.view(shape)


def llama_config(size: str, vocab: int = 49152):
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )


def write(size: str, out: Path, tokenizer: str | None, shard_bytes: int, seed: int) -> int:
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    config = llama_config(size)
    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    state = remove_tied_weights_from_state_dict(meta.state_dict(), meta)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL).normal_(0.0, config.initializer_range, generator=generator)
    groups: list[list[str]] = [[]]
    filled = 0
    for key, tensor in state.items():
        size_bytes = tensor.numel() * 4
        if groups[-1] and filled + size_bytes > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(key)
        filled += size_bytes
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for key in group:
            shape = state[key].shape
            if key.endswith("norm.weight"):
                shard[key] = torch.ones(shape)
            else:
                shard[key] = _draw(pool, shape, generator)
            total += shard[key].numel()
        save_file(shard, str(out / name), metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": total * 4}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    if tokenizer:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", default=None, help="Folder whose tokenizer is copied (vocab 49152).")
    parser.add_argument("--shard-size-mb", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = write(args.size, args.out, args.tokenizer, args.shard_size_mb * 1024**2, args.seed)
    print(json.dumps({"size": args.size, "params": params, "bytes": params * 4, "out": str(args.out)}))


if __name__ == "__main__":
    main()
