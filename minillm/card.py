"""Model cards for exports, generated from ``minillm.json`` (and evaluation results when present)."""

from __future__ import annotations

from typing import Any


def render_card(metadata: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """A Hub-ready README.md: YAML front matter, what was done, widths, how to load and reproduce."""
    plan = metadata.get("plan", {})
    base = metadata.get("base_model", "unknown")
    remote = metadata.get("trust_remote_code", False)
    front = ["---", "library_name: transformers", "tags:", "- minillm", "- pruned", "- structured-pruning"]
    if metadata.get("license"):
        front.append(f"license: {metadata['license']}")
    if base and not str(base).startswith(("/", ".")) and not str(base).endswith(".gguf"):
        front.append(f"base_model: {base}")
    front.append("---")
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
        lines += ["", "## Per-layer widths", "", "| layer | heads | kv heads | MLP channels |", "|---|---|---|---|"]
        lines += [f"| {w['layer']} | {w['heads']} | {w['kv_heads']} | {w['channels']} |" for w in widths]
    if evaluation:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in evaluation.items()]
    if metadata.get("command"):
        lines += ["", "## Reproduce", "", "```bash", metadata["command"], "```"]
    return "\n".join(lines) + "\n"
