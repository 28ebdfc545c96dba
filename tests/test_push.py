"""minillm push: the exact upload (commit operations + generated card), with the network calls replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_ids, tiny_model, tiny_tokenizer

from minillm.api import prune
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError
from minillm.hub import build_upload, push

EVAL = {
    "model": "pruned", "params": 1000,
    "perplexity": {"perplexity": 23.5, "windows": 10, "seq_len": 128, "tokens": 1270,
                   "source": "wiki.test.txt", "protocol": "10 non-overlapping windows of 128 tokens"},
    "zeroshot": {"tasks": {"piqa": {"task": "piqa", "metric": "acc_norm", "value": 0.61, "stderr": 0.02,
                                    "samples": 200}}, "mean": 0.61, "num_fewshot": 0, "limit": 200},
    "reference": {"model": "dense", "perplexity": {"perplexity": 21.0},
                  "zeroshot": {"tasks": {"piqa": {"metric": "acc_norm", "value": 0.65}}, "mean": 0.65}},
    "retained": {"piqa": 0.61 / 0.65, "mean": 0.61 / 0.65, "perplexity": 21.0 / 23.5},
    "command": "minillm eval pruned --tasks piqa --data-dir zeroshot --limit 200",
}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-layer-width export of a local base model whose card says ``license: apache-2.0``."""
    root = tmp_path_factory.mktemp("push")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    out = root / "pruned"
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    prune(str(base), ratio=0.3, allocation="global", calib=calibration, spsa_steps=1,
          out=out, device_map=None, command="minillm prune --model base --ratio 0.3")
    (out / "minillm_eval.json").write_text(json.dumps(EVAL))
    return out


class FakeApi:
    """Stands in for HfApi: records the calls instead of sending them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def whoami(self) -> dict:
        self.calls.append(("whoami", (), {}))
        return {"name": "user"}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_commit(self, *args, **kwargs):
        self.calls.append(("create_commit", args, kwargs))
        return type("Info", (), {"commit_url": "https://huggingface.co/user/tiny/commit/abc"})()


def test_upload_is_one_commit_of_every_file_plus_the_generated_card(export: Path) -> None:
    upload = build_upload(export, "user/tiny", private=True)
    on_disk = sorted(p.name for p in export.iterdir())
    assert upload.paths == on_disk  # README.md is in both: the folder's is replaced by the generated card
    ops = {op.path_in_repo: op for op in upload.operations}
    assert sorted(ops) == on_disk and len(upload.operations) == len(on_disk)
    assert ops["README.md"].path_or_fileobj == upload.card.encode()
    assert ops["model.safetensors"].path_or_fileobj == str(export / "model.safetensors")
    card = upload.card
    metadata = json.loads((export / "minillm.json").read_text())
    assert "license: apache-2.0" in card  # carried from the base model's card
    assert f"{metadata['params_before']:,}" in card and f"{metadata['params_after']:,}" in card
    assert "trust_remote_code=True" in card and "modeling_minillm.py" in card
    assert "## Per-layer widths" in card and "| 0 |" in card
    assert "| perplexity | perplexity | 23.5000 | 21.0000 | 89.4% |" in card
    assert "| piqa | acc_norm | 0.6100 | 0.6500 | 93.8% |" in card
    assert "minillm prune --model base --ratio 0.3" in card and EVAL["command"] in card


def test_push_sends_exactly_the_upload(export: Path) -> None:
    upload = build_upload(export, "user/tiny", private=True, license="mit")
    api = FakeApi()
    url = push(upload, token="hf_test", api=api)
    assert [c[0] for c in api.calls] == ["whoami", "create_repo", "create_commit"]
    assert api.calls[1][1] == ("user/tiny",) and api.calls[1][2]["private"] is True
    assert api.calls[2][2]["operations"] is upload.operations and api.calls[2][2]["repo_id"] == "user/tiny"
    assert url.endswith("/commit/abc") and "license: mit" in upload.card


def test_missing_token_says_how_to_log_in(export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeApi()
    with pytest.raises(UsageError, match="hf auth login"):
        push(build_upload(export, "user/tiny"), api=api)
    assert api.calls == []


def test_bad_input_and_dry_run(export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    with pytest.raises(UsageError, match="not a valid Hub repo id"):
        build_upload(export, "user/bad name")
    with pytest.raises(UsageError, match=r"no config\.json"):
        build_upload(tmp_path, "user/tiny")
    with pytest.raises(UsageError, match="does not exist"):
        build_upload(export, "user/tiny", evaluation=tmp_path / "none.json")

    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run must not touch the network")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    register_commands()
    run = CliRunner().invoke(app, ["push", str(export), "--repo", "user/tiny", "--dry-run"])
    assert run.exit_code == 0, run.output
    assert "model.safetensors" in run.output and "## Evaluation" in run.output
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    run = CliRunner().invoke(app, ["push", str(export), "--repo", "user/tiny"])
    assert run.exit_code == 2 and "hf auth login" in run.output
