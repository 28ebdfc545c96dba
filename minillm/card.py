"""Model cards for exports, generated from ``minillm.json`` (and evaluation results when present).

The YAML front matter is huggingface_hub's :class:`~huggingface_hub.ModelCardData` (the Hub's own schema).
"""

from __future__ import annotations

from typing import Any


def render_card(metadata: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """A Hub-ready README.md: YAML front matter, what was done, widths, how to load and reproduce."""
    plan = metadata.get("plan", {})
    base = metadata.get("base_model", "unknown")
    remote = metadata.get("trust_remote_code", False)
    from huggingface_hub import ModelCardData

    on_hub = base and not str(base).startswith(("/", ".")) and not str(base).endswith(".gguf")
    data = ModelCardData(library_name="transformers", tags=["minillm", "pruned", "structured-pruning"],
                         license=metadata.get("license") or None, base_model=base if on_hub else None)
    front = ["---", data.to_yaml(), "---"]
    before, after = metadata.get("params_before", 0), metadata.get("params_after", 0)
    lines = [
        *front,
        "",
        f"# {metadata.get('name', 'Pruned model')}",
        "",
        f"Structurally pruned from `{base}` with [minillm](https://pypi.org/project/minillm-prune/): "
        f"criterion `{metadata.get('criterion')}`, {plan.get('allocation', '?')} allocation, "
        f"head mode `{plan.get('head_mode', '?')}`.",
        "",
        "| | parameters |",
        "|---|---|",
        f"| before | {before:,} |",
        f"| after | {after:,} |",
        f"| removed | {metadata.get('achieved_ratio', 0):.2%} (target {plan.get('target_ratio', 0):.0%}) |",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(path{', trust_remote_code=True' if remote else ''})",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
    ]
    if remote:
        lines += ["", "Layers have different widths, which the stock config cannot express; the small "
                  "`modeling_minillm.py` in this folder resizes them (it imports only transformers)."]
    widths = metadata.get("layer_widths", [])
    if widths:
        lines += ["", "## Per-layer widths", "",
                  "| layer | heads | kv heads | MLP channels |", "|---|---|---|---|"]
        lines += [f"| {w['layer']} | {w['heads']} | {w['kv_heads']} | {w['channels']} |" for w in widths]
    recovery = metadata.get("recovery")
    if recovery:
        lines += ["", *_recovery_lines(recovery)]
    if evaluation:
        lines += ["", *_evaluation_lines(evaluation)]
    commands = [metadata.get("command"), (recovery or {}).get("command"), (evaluation or {}).get("command")]
    commands = [c for c in commands if c]
    if commands:
        lines += ["", "## Reproduce", "", "```bash", *commands, "```"]
    return "\n".join(lines) + "\n"


def _recovery_lines(recovery: dict[str, Any]) -> list[str]:
    """What the LoRA recovery did, in one short paragraph."""
    cfg, run = recovery.get("config", {}), recovery.get("train", {})
    losses, val = run.get("losses") or [], run.get("val_ppl") or []
    text = (f"Recovered with LoRA (r={cfg.get('rank')}, alpha={cfg.get('alpha')}, lr={cfg.get('lr')}, "
            f"{len(losses)} steps of {cfg.get('batch_size')}x{cfg.get('grad_accum')} examples of "
            f"{cfg.get('max_length')} tokens) on `{recovery.get('data')}`, merged into the weights.")
    if val:
        text += f" Validation perplexity {val[0][1]:.2f} → {val[-1][1]:.2f}."
    return ["## Recovery", "", text]


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """``minillm eval --json`` output as a table.

    With the reference model and retained fraction if present.
    """
    if "perplexity" not in evaluation and "zeroshot" not in evaluation:  # a plain {metric: value} mapping
        return ["## Evaluation", "", "| metric | value |", "|---|---|",
                *[f"| {k} | {v} |" for k, v in evaluation.items()]]
    reference, kept = evaluation.get("reference") or {}, evaluation.get("retained") or {}

    def rows(report: dict[str, Any]) -> dict[str, tuple[str, float]]:
        out: dict[str, tuple[str, float]] = {}
        if report.get("perplexity"):
            out["perplexity"] = ("perplexity", report["perplexity"]["perplexity"])
        for task, score in (report.get("zeroshot") or {}).get("tasks", {}).items():
            out[task] = (score["metric"], score["value"])
        if report.get("zeroshot"):
            out["mean"] = ("mean of tasks", report["zeroshot"]["mean"])
        return out

    mine, ref = rows(evaluation), rows(reference)
    header = "| task | metric | this model |" + (" reference | retained |" if ref else "")
    lines = ["## Evaluation", "", header, "|---|---|---|" + ("---|---|" if ref else "")]
    for key, (metric, value) in mine.items():
        row = f"| {key} | {metric} | {value:.4f} |"
        if ref:
            row += f" {ref[key][1]:.4f} |" if key in ref else " - |"
            row += f" {kept[key]:.1%} |" if key in kept else " - |"
        lines.append(row)
    notes = []
    ppl = evaluation.get("perplexity")
    if ppl:
        notes.append(f"Perplexity on `{ppl.get('source')}`: {ppl.get('protocol')}.")
    zeroshot = evaluation.get("zeroshot")
    if zeroshot:
        notes.append(f"Zero-shot tasks through lm-eval, {zeroshot.get('num_fewshot', 0)}-shot, "
                     f"limit {zeroshot.get('limit') or 'none'} examples per task.")
    if ref:
        notes.append(f"Reference: `{reference.get('model')}`; retained = score / reference "
                     "(perplexity: reference / perplexity).")
    return [*lines, "", " ".join(notes)] if notes else lines
