"""Image data for the CNN pruner: the bundled MNIST subset, scikit-learn digits, CIFAR-10, image folders.

Everything is loaded into memory as float tensors ``[N, C, H, W]`` (the sets this module targets are
small), normalised per channel with statistics of the training split. No torchvision: CIFAR-10 is read
from its python pickle batches and folders through Pillow.

``--data`` strings (:func:`load_data`):

- ``mnist5k`` or ``mnist5k:PATH`` — 5,000 MNIST digits as CSV (784 pixels then the label per line, as
  ``../shared/data/images/mnist_5k.csv.gz``); a fixed split from ``torch.Generator().manual_seed(seed)``:
  4,000 train / 1,000 test. Images are zero-padded to ``image_size`` (32 for VGG's five pools).
- ``digits`` — scikit-learn's 1,797 8x8 digits, 80/20 seeded split (for fast tests).
- ``cifar10:DIR`` — ``DIR`` holds ``data_batch_1..5`` and ``test_batch`` (``cifar-10-batches-py``).
- ``folder:DIR`` — torchvision ``ImageFolder`` layout: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``
  (or ``val``), resized to ``image_size``.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

MNIST_ENV = "MINILLM_MNIST_CSV"
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class ImageData:
    """A train/test split in memory; ``description`` says where it came from and how it was split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    description: str

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def default_mnist_path() -> Path:
    """``$MINILLM_MNIST_CSV``, else ``../shared/data/images/mnist_5k.csv.gz`` from the cwd or the repo."""
    if os.environ.get(MNIST_ENV):
        return Path(os.environ[MNIST_ENV])
    rel = Path("..") / "shared" / "data" / "images" / "mnist_5k.csv.gz"
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / rel).exists():
            return base / rel
    return Path.cwd() / rel


def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    extra = size - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad {x.shape[-1]}px images down to {size}px")
    left = extra // 2
    return F.pad(x, (left, extra - left, left, extra - left))


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int, seed: int) -> tuple[torch.Tensor, ...]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def load_mnist_csv(
    path: str | Path, image_size: int = 28, n_train: int | None = None, seed: int = 0
) -> ImageData:
    """MNIST-style CSV; ``n_train`` defaults to 4,000 of 5,000 (80% for files of another size)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MNIST CSV not found: {path} (set {MNIST_ENV} or pass mnist5k:PATH)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got shape {arr.shape}")
    x = torch.from_numpy(arr[:, :784] / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(arr[:, 784]).long()
    if n_train is None:
        n_train = 4000 if len(y) == 5000 else int(0.8 * len(y))
    if not 0 < n_train < len(y):
        raise ValueError(f"n_train must be in (0, {len(y)}), got {n_train}")
    trx, try_, tex, tey = _split(_pad_to(x, image_size), y, n_train, seed)
    trx, tex = _normalise(trx, tex)
    desc = (
        f"MNIST subset {path.name}: seeded split (seed {seed}) "
        f"{len(try_)} train / {len(tey)} test, {image_size}px"
    )
    return ImageData(trx, try_, tex, tey, 10, desc)


def load_digits(image_size: int = 8, seed: int = 0) -> ImageData:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from exc
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target).long()
    trx, try_, tex, tey = _split(_pad_to(x, image_size), y, int(0.8 * len(y)), seed)
    trx, tex = _normalise(trx, tex)
    return ImageData(trx, try_, tex, tey, 10, f"sklearn digits: seeded 80/20 split (seed {seed})")


#: the only globals a CIFAR-10 batch needs: numpy's array rebuilders (and the bytes decoder of protocol 2)
PICKLE_ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; any other global is refused.

    Why: a pickle can call any importable function while loading (``os.system``); CIFAR's python
    batches are pickles, so anyone who hands out a dataset folder could otherwise run code.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a data batch: only numpy arrays, lists, dicts and "
                "bytes are allowed (is this really a CIFAR-10 python batch?)"
            )
        return super().find_class(module, name)


def load_cifar10(root: str | Path) -> ImageData:
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*names, "test_batch"] if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(f"{root}: missing CIFAR-10 python batches {missing} (cifar-10-batches-py)")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(root / name, "rb") as fh:
            d = RestrictedUnpickler(fh, encoding="bytes").load()
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise ValueError(f"{root / name}: not a CIFAR-10 python batch (no data/labels)")
        return d[b"data"], np.asarray(d[b"labels"])

    parts = [read(n) for n in names]
    trx = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().view(-1, 3, 32, 32) / 255
    try_ = torch.from_numpy(np.concatenate([p[1] for p in parts])).long()
    tx, ty = read("test_batch")
    tex = torch.from_numpy(tx).float().view(-1, 3, 32, 32) / 255
    trx, tex = _normalise(trx, tex)
    return ImageData(trx, try_, tex, torch.from_numpy(ty).long(), 10, f"CIFAR-10 from {root}")


def _read_folder(split_dir: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((split_dir / cls).iterdir()):
            if f.suffix.lower() in _IMAGE_EXTS:
                img = Image.open(f).convert("RGB").resize((size, size))
                xs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
                ys.append(label)
    if not xs:
        raise ValueError(f"{split_dir}: no images found")
    return torch.stack(xs), torch.tensor(ys)


def load_image_folder(root: str | Path, image_size: int = 32) -> ImageData:
    root = Path(root)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"{root}: expected train/<class>/ and test/<class>/ (or val/) folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    trx, try_ = _read_folder(root / "train", classes, image_size)
    tex, tey = _read_folder(test_dir, classes, image_size)
    trx, tex = _normalise(trx, tex)
    return ImageData(trx, try_, tex, tey, len(classes), f"image folder {root} ({len(classes)} classes)")


def load_data(spec: str, image_size: int | None = None, seed: int = 0) -> ImageData:
    """Parse a ``--data`` string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist5k":
        return load_mnist_csv(arg or default_mnist_path(), image_size or 28, seed=seed)
    if kind == "digits":
        return load_digits(image_size or 8, seed=seed)
    if kind == "cifar10" and arg:
        return load_cifar10(arg)
    if kind == "folder" and arg:
        return load_image_folder(arg, image_size or 32)
    raise ValueError(f"unknown --data {spec!r}; use mnist5k[:PATH], digits, cifar10:DIR or folder:DIR")


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches in order, or shuffled by ``generator`` when one is given."""
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels: pad-and-crop augmentation. The border is
    replicated rather than zero-filled, since zero is the mean, not the background, after normalising."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    batch_idx = torch.arange(n).view(n, 1, 1, 1)
    chan_idx = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[batch_idx, chan_idx, rows, cols]
