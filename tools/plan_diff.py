"""Are two prune plans the same decision? (issue 14's "behaviour unchanged" check)

Compares the JSON that ``minillm prune --dry-run`` prints, made by two checkouts of minillm from the
same model, data and seed: every layer's kept query heads, key/value heads and MLP channels, the kept
hidden channels and layers, and the parameter counts. Prints one line per plan pair and exits 1 if
any differ, naming the first layers that differ.

    PYTHONPATH=/work/wt-base minillm prune --model M --criterion fms --ratio 0.2 --dry-run --seed 0 \
        --calib wiki.train.txt -q > before.json
    minillm prune --model M --criterion fms --ratio 0.2 --dry-run --seed 0 --calib wiki.train.txt \
        --calib-samples 32 --head-mode kv -q > after.json
    python tools/plan_diff.py before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def read_plan(path: Path) -> dict[str, Any]:
    """The plan JSON object in a ``--dry-run`` output (the first ``{`` to its matching end)."""
    text = path.read_text()
    start = text.index("{")
    plan, _ = json.JSONDecoder().raw_decode(text[start:])
    return plan


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two plans (empty = the same decision)."""
    found: list[str] = []
    for key in ("params_before", "params_after", "hidden", "kept_layers", "head_mode", "allocation"):
        if before.get(key) != after.get(key):
            found.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    layers_before, layers_after = before["layers"], after["layers"]
    if len(layers_before) != len(layers_after):
        found.append(f"layer count {len(layers_before)} -> {len(layers_after)}")
    for old, new in zip(layers_before, layers_after, strict=False):
        for part in ("heads", "kv_heads", "channels"):
            if old[part] != new[part]:
                changed = len(set(old[part]) ^ set(new[part]))
                found.append(f"layer {old['index']} {part}: {changed} indices differ")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = read_plan(args.before), read_plan(args.after)
    found = differences(before, after)
    label = f"{args.before.name} vs {args.after.name}"
    if found:
        print(f"{label}: DIFFERENT ({len(found)} differences): " + "; ".join(found[:5]))
        sys.exit(1)
    print(f"{label}: same plan ({len(before['layers'])} layers, params after {after['params_after']:,})")


if __name__ == "__main__":
    main()
