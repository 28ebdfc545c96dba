"""The ``custom_dataset`` loader of minillm's local task YAMLs (lm-eval calls it with the task metadata)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: environment fallback for ``data_dir`` when the task metadata does not carry one
DATA_DIR_ENV = "MINILLM_ZEROSHOT_DIR"


def load_split(
    data_dir: str | None = None, file: str | None = None, split: str = "validation", **_: Any
) -> Any:
    """``{split: Dataset}`` read from ``data_dir/file`` (lm-eval passes metadata and dataset_kwargs)."""
    import datasets

    folder = data_dir or os.environ.get(DATA_DIR_ENV)
    if not folder:
        raise ValueError(
            f"no zero-shot data folder: pass --data-dir DIR (or metadata data_dir, or ${DATA_DIR_ENV})"
        )
    if file is None:
        raise ValueError("task YAML is missing dataset_kwargs.file")
    path = Path(folder) / file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --data-dir must hold {file} "
            "(one JSON object per line, the Hugging Face dataset's fields)"
        )
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    return datasets.DatasetDict({split: rows})
