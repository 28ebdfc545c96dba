"""lm-eval task YAMLs for the seven zero-shot tasks of the pruning literature, reading local files.

Each YAML mirrors lm-eval's built-in task of the same name (same prompt, target, choices and metrics,
and lm-eval's own preprocessing functions) but loads its validation split from a folder of JSON-lines
files with the Hugging Face datasets' fields (``boolq.validation.jsonl``, ``piqa.validation.jsonl`` …),
so evaluation works with no network. The folder comes from the task metadata key ``data_dir``:
``minillm eval M --tasks piqa --data-dir DIR``, or with plain lm-eval
``lm_eval --include_path <this folder> --metadata '{"data_dir": "DIR"}' --tasks piqa``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent
