"""``minillm cnn train|prune|eval`` end to end on a synthetic MNIST-style CSV, and its error paths."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from cnn_helpers import single_thread  # noqa: F401
from typer.testing import CliRunner

from minillm.vision.cli import app
from minillm.vision.data import load_data, load_image_folder, random_shift

runner = CliRunner()


def _text(result) -> str:
    """CLI output with rich's box drawing and line wrapping undone."""
    return " ".join(result.output.replace("│", " ").split())


def _write_csv(path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = i % 3
        img = rng.integers(0, 30, size=(28, 28))
        img[4 + 6 * label : 10 + 6 * label, 8:20] = 255
        rows.append(",".join(map(str, [*img.flatten(), label])))
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    return f"mnist5k:{path}"


@pytest.fixture()
def csv_data(tmp_path):
    """24 synthetic 28x28 'digits' (a bright square whose position encodes the class)."""
    return _write_csv(tmp_path / "tiny.csv.gz")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One dense export shared by the error-path tests (which must leave it untouched)."""
    root = tmp_path_factory.mktemp("trained")
    data = _write_csv(root / "tiny.csv.gz")
    r = runner.invoke(app, ["train", "-o", str(root / "dense"), "--data", data, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    return root / "dense"


def test_train_prune_eval(tmp_path, csv_data):
    dense = tmp_path / "dense"
    r = runner.invoke(
        app, ["train", "--out", str(dense), "--data", csv_data, "--epochs", "1", "--batch-size", "16"]
    )
    assert r.exit_code == 0, r.output
    assert (dense / "model.safetensors").exists() and (dense / "minillm_cnn.json").exists()

    r = runner.invoke(
        app,
        [
            "prune",
            str(dense),
            "--criterion",
            "ifso",
            "--flops-ratio",
            "0.4",
            "--dry-run",
            "--calib-batches",
            "2",
            "--calib-batch-size",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Prune plan" in _text(r) and "stages.0.0.conv1" in _text(r)

    pruned = tmp_path / "pruned"
    r = runner.invoke(
        app,
        [
            "prune",
            str(dense),
            "--criterion",
            "taylor",
            "--flops-ratio",
            "0.4",
            "--out",
            str(pruned),
            "--finetune-epochs",
            "1",
            "--bn-recalib",
            "8",
            "--calib-batches",
            "2",
            "--calib-batch-size",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "fine-tune" in _text(r) and "BN recalibration" in _text(r)
    meta = json.loads((pruned / "minillm_cnn.json").read_text())["meta"]
    assert meta["plan"]["criterion"] == "taylor" and meta["plan"]["achieved_ratio"] >= 0.4
    assert meta["metrics_after"]["flops"] <= 0.6 * meta["metrics_before"]["flops"]

    r = runner.invoke(app, ["eval", str(pruned)])
    assert r.exit_code == 0, r.output
    assert "Summary" in _text(r)


def test_prune_by_parameter_ratio(tmp_path, csv_data):
    dense = tmp_path / "dense"
    assert runner.invoke(app, ["train", "-o", str(dense), "--data", csv_data, "--epochs", "1"]).exit_code == 0
    r = runner.invoke(
        app, ["prune", str(dense), "--criterion", "l1", "--ratio", "0.3", "-o", str(tmp_path / "p")]
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p" / "minillm_cnn.json").read_text())["meta"]
    assert meta["plan"]["target_kind"] == "params"
    assert meta["metrics_after"]["params"] <= 0.7 * meta["metrics_before"]["params"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["prune", "{dense}", "--criterion", "ifs", "--flops-ratio", "0.5", "--dry-run"],
            "Did you mean 'ifso'",
        ),
        (["prune", "{dense}", "--flops-ratio", "0.5", "--ratio", "0.5", "--dry-run"], "exactly one"),
        (["prune", "{dense}", "--flops-ratio", "0.5"], "--out"),
        (["prune", "{dense}", "--flops-ratio", "1.5", "--dry-run"], "(0, 1)"),
        (["prune", "{missing}", "--flops-ratio", "0.5", "--dry-run"], "not a minillm CNN export"),
        (["prune", "{dense}", "--flops-ratio", "0.5", "--dry-run", "--allocation", "layer"], "'uniform'"),
        (["train", "-o", "{out}", "--arch", "resnet21"], "unknown architecture"),
        (["train", "-o", "{out}", "--data", "imagenet"], "unknown --data"),
        (["eval", "{dense}", "--data", "mnist5k:{missing}/x.csv"], "not found"),
    ],
)
def test_bad_input_fails_cleanly(tmp_path, trained, args, message):
    before = sorted(p.name for p in trained.parent.iterdir()), sorted(p.name for p in trained.iterdir())
    fmt = {"dense": str(trained), "missing": str(tmp_path / "missing"), "out": str(tmp_path / "new")}
    r = runner.invoke(app, [a.format(**fmt) for a in args])
    assert r.exit_code != 0
    assert message in _text(r)
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert (
        sorted(p.name for p in trained.parent.iterdir()),
        sorted(p.name for p in trained.iterdir()),
    ) == before


def test_mnist_split_is_seeded_and_padded(csv_data):
    a, b = load_data(csv_data, image_size=32), load_data(csv_data, image_size=32)
    assert a.train_x.shape == (19, 1, 32, 32) and a.test_x.shape == (5, 1, 32, 32)
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(load_data(csv_data, seed=1).train_y, a.train_y)


def test_image_folder_layout(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (10, 12), (i * 40, 90, 200)).save(tmp_path / split / cls / f"{i}.png")
    data = load_image_folder(tmp_path, image_size=16)
    assert data.train_x.shape == (4, 3, 16, 16) and data.num_classes == 2
    assert data.train_y.tolist() == [0, 0, 1, 1]


def test_cifar10_python_batches(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    data = load_data(f"cifar10:{tmp_path}")
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    assert data.train_y.tolist() == [1, 7] * 5
    assert abs(float(data.train_x.mean())) < 1e-5  # normalised with training statistics


def test_random_shift_moves_pixels_within_bounds():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
    assert set(out.unique().tolist()) <= set(x.unique().tolist())
