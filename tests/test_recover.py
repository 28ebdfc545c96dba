"""minillm recover: LoRA lowers the loss, the merged export has no LoRA left and reloads with identical
logits, checkpoints resume the exact run, and bad data fails with one clear line before writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, random_ids, tiny_model, tiny_tokenizer
from helpers import pattern_text

from minillm.api import count_parameters, prune
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError
from minillm.loading import load_model
from minillm.recover import RecoverConfig, recover
from minillm.recover.data import IGNORE, load_examples


def _pattern_text(path: Path, words: int = 1200) -> Path:
    return pattern_text(path, VOCAB, words)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-layer-width (global allocation) export: it loads through its own modeling_minillm.py."""
    out = tmp_path_factory.mktemp("recover") / "pruned"
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    prune(tiny_model("llama"), ratio=0.3, allocation="global", calib=calibration, spsa_steps=1,
          tokenizer=tiny_tokenizer(), out=out)
    assert (out / "modeling_minillm.py").is_file()
    return out


def _config(**overrides) -> RecoverConfig:
    settings = dict(method="lora", max_steps=12, batch_size=4, grad_accum=1, max_length=16, lr=1e-2,
                    dropout=0.0, warmup_steps=0, val_size=4, eval_every=0, save_every=0)
    return RecoverConfig(**{**settings, **overrides})


def test_recover_lowers_loss_and_merged_export_reloads_identically(pruned: Path, tmp_path: Path) -> None:
    data = _pattern_text(tmp_path / "train.txt")
    out = tmp_path / "recovered"
    result = recover(str(pruned), str(data), out, _config(), trust_remote_code=True)
    losses = result.log.losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25  # nats: a clear drop, not noise
    assert result.log.val_ppl[-1][1] < 0.9 * result.log.val_ppl[0][1]
    # merged: plain Linear layers, no peft wrappers or lora weights anywhere
    assert not any("lora" in name for name, _ in result.model.named_modules())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)
    assert not (out / "adapter_config.json").exists()
    # the plan and widths are carried over; merging LoRA adds no parameters
    before = json.loads((pruned / "minillm.json").read_text())
    after = json.loads((out / "minillm.json").read_text())
    assert after["plan"] == before["plan"] and after["layer_widths"] == before["layer_widths"]
    assert after["recovery"]["config"]["rank"] == 8 and len(after["recovery"]["train"]["losses"]) == 12
    assert count_parameters(result.model) == before["params_after"]
    assert (out / "modeling_minillm.py").is_file() and "## Recovery" in (out / "README.md").read_text()
    assert not (tmp_path / "recovered.checkpoints").exists()
    reloaded = load_model(str(out), device_map=None, dtype="float32", trust_remote_code=True)
    original = load_model(str(pruned), device_map=None, dtype="float32", trust_remote_code=True)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        expected, got, old = result.model(ids).logits, reloaded(ids).logits, original(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - old).abs().max() > 1e-3  # the recovery really changed the weights


def test_resume_continues_the_same_run(pruned: Path, tmp_path: Path) -> None:
    data = _pattern_text(tmp_path / "train.txt")
    ckpt = tmp_path / "ckpt"
    full = recover(str(pruned), str(data), tmp_path / "full", _config(max_steps=6, save_every=3),
                   checkpoint_dir=ckpt, keep_checkpoints=True, trust_remote_code=True)
    assert [p.name for p in ckpt.iterdir()] == ["step-0000003"]
    spare = _copy(ckpt, tmp_path / "spare")
    resumed = recover(str(pruned), str(data), tmp_path / "resumed", _config(max_steps=6, save_every=3),
                      checkpoint_dir=ckpt, resume=True, trust_remote_code=True)
    assert resumed.log.resumed_from == 3 and not ckpt.exists()  # removed after the successful export
    losses = torch.tensor(resumed.log.losses), torch.tensor(full.log.losses)
    torch.testing.assert_close(*losses, atol=1e-5, rtol=0)
    ids = random_ids(1, 8, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(ids).logits, full.model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="different lr"):
        recover(str(pruned), str(data), tmp_path / "other", _config(max_steps=6, save_every=3, lr=1e-3),
                checkpoint_dir=spare, resume=True, trust_remote_code=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_alpaca_examples_mask_the_prompt(tmp_path: Path) -> None:
    rows = [{"instruction": "w1 w2", "input": "w3" if i % 2 else "", "output": f"w{i + 4} w5"}
            for i in range(6)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_examples(tiny_tokenizer(), str(path), max_length=64)
    assert len(examples) == 6
    for example in examples:
        targets = [t for t in example.labels if t != IGNORE]
        assert targets == example.input_ids[-len(targets):]  # only the response (and EOS) is learned
        assert len(targets) < len(example.input_ids)


def test_wrong_fields_name_the_expected_ones_and_write_nothing(pruned: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from minillm.cli import app, register_commands

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "w1", "answer": "w2"}\n' * 4)
    with pytest.raises(UsageError, match=r"expected a 'text' field .* 'instruction'.*'output'"):
        recover(str(pruned), str(bad), tmp_path / "out", _config(), trust_remote_code=True)
    register_commands()
    args = ["recover", str(pruned), "--data", str(bad), "--out", str(tmp_path / "out"),
            "--trust-remote-code"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 2 and "instruction" in run.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.slow
def test_two_process_data_parallel_run_exports_once(pruned: Path, tmp_path: Path) -> None:
    """The accelerate path of ``accelerate launch``: two CPU processes (gloo) shard the data, reduce the
    validation loss, and only the main process writes checkpoints and the export."""
    import os
    import subprocess
    import sys

    data = _pattern_text(tmp_path / "train.txt")
    out = tmp_path / "ddp"
    script = "from minillm.cli import main; main()"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    launcher = tmp_path / "launch_minillm.py"
    launcher.write_text(script + "\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher), "recover",
            str(pruned), "--trust-remote-code", "--data", str(data), "--out", str(out), "--max-steps", "4",
            "--batch-size", "4",
            "--grad-accum", "1", "--max-length", "16", "--val-size", "4", "--eval-every", "2",
            "--save-every", "2"]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    metadata = json.loads((out / "minillm.json").read_text())
    train_log = metadata["recovery"]["train"]
    assert len(train_log["losses"]) == 4
    single_process_steps = -(-train_log["train_examples"] // 4)
    assert train_log["steps_per_epoch"] == -(-single_process_steps // 2)  # the data is split across 2 ranks
    output = run.stdout + run.stderr  # one log and one summary, from the main process only
    assert output.count("checkpoint saved to") == 1 and output.count("step 0: validation perplexity") == 1
    assert not (tmp_path / "ddp.checkpoints").exists()
