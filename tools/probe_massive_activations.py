"""Where the refit's moments ``H`` come from: each closing projection's input energy by token position.

Why: the refit weights every calibration token by its squared input, ``H = Σ x xᵀ``, and damps with
``λ · mean(diag H)``. Models with massive activations (Sun et al., 2024) put almost all of a few layers'
energy on the first token of every window — the attention sink — so those layers' fits and damping are
set by one token in 128. This reports, for every decoder block on the calibration windows as
``minillm prune`` samples them (dense model, one forward pass): the share of Σ‖x‖² of o_proj's and
down_proj's inputs that position 0 holds, the share of the top 1 % of tokens, and the residual stream's RMS
at position 0 against the median of the other positions.

    python tools/probe_massive_activations.py --model ~/.cache/minillm-bench/smollm2-135m \
        --calib ../shared/data/text/wiki.train.txt --json docs/bench/massive_activations.json
"""

from __future__ import annotations

import argparse
import json

import torch


def _shares(energies: list[torch.Tensor]) -> dict[str, float]:
    """``energies``: per batch, (batch, tokens) squared norms of the inputs."""
    energy = torch.cat(energies)
    total = float(energy.sum())
    ranked = energy.flatten().sort(descending=True).values
    return {"position0": round(float(energy[:, 0].sum()) / total, 4),
            "top1pct": round(float(ranked[: max(1, ranked.numel() // 100)].sum()) / total, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()

    from minillm.arch import adapter_for
    from minillm.calibration.data import calibration_set
    from minillm.calibration.hooks import input_hooks
    from minillm.loading import load_model, load_tokenizer
    from minillm.scoring.base import closing_linears

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device_map="cpu", dtype="float32")
    adapter = adapter_for(model.config)
    calibration = calibration_set(tokenizer, args.calib, args.calib_samples, args.seq_len, 0, 8)
    layers = adapter.decoder_layers(model)
    closings = {(i, name): linear for i, layer in enumerate(layers)
                for name, linear in zip(("o_proj", "down_proj"), closing_linears(adapter, layer),
                                        strict=True)}
    names = {linear: key for key, linear in closings.items()}
    energies: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in closings}
    residual: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def observe(module: torch.nn.Module, x: torch.Tensor) -> None:
        energies[names[module]].append(x.detach().double().pow(2).sum(-1))

    with torch.no_grad(), input_hooks(list(closings.values()), observe):
        for batch in calibration.batches():
            hidden = model(batch, output_hidden_states=True).hidden_states
            for i in range(len(layers)):  # the residual stream entering block i
                residual[i].append(hidden[i].double().pow(2).mean(-1).sqrt())
    rows = []
    for i in range(len(layers)):
        rms = torch.cat(residual[i])
        rows.append({"layer": i, "o_proj": _shares(energies[(i, "o_proj")]),
                     "down_proj": _shares(energies[(i, "down_proj")]),
                     "residual_rms_position0": round(float(rms[:, 0].mean()), 2),
                     "residual_rms_median_other": round(float(rms[:, 1:].median()), 2)})
    print("layer | o_proj pos0 | o_proj top1% | down_proj pos0 | down_proj top1% "
          "| residual RMS pos0 / others")
    for r in rows:
        print(f"{r['layer']:5d} | {r['o_proj']['position0']:11.3f} | {r['o_proj']['top1pct']:12.3f} | "
              f"{r['down_proj']['position0']:14.3f} | {r['down_proj']['top1pct']:15.3f} | "
              f"{r['residual_rms_position0']:.1f} / {r['residual_rms_median_other']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "calib": args.calib, "calib_samples": args.calib_samples,
                       "seq_len": args.seq_len, "layers": rows}, f, indent=1)


if __name__ == "__main__":
    main()
