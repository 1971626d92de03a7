"""Data sets for the command-line trainer, held as in-memory tensors.

- ``digits``: scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes);
  no download. A fixed, stratified 80/20 split.
- ``gratings``: a harder task generated on the spot (no download, no file): 16x16 images of
  a grating whose orientation and frequency give one of 10 classes, under a random phase,
  contrast, a distractor grating and noise. Small enough for a CPU, hard enough that
  pruning to 95-99% costs accuracy.
- ``gratings20``: the same with 10 orientations 18 degrees apart, so 20 classes: a finer
  distinction, for deeper nets (the ResNet-20 recipe).
- ``cifar10``: CIFAR-10 from its python-format batches on disk (``data_batch_1..5`` and
  ``test_batch``, in ``data_dir`` or ``data_dir/cifar-10-batches-py``); never downloaded.
- ``imagefolder``: images in ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``
  (ImageNet's layout), read from disk as needed: :class:`dpf_ext.app.image_folder.ImageFolder`.

Training reads a data set through ``train_size``, ``train_batch(idx, generator)`` and
``test_batches(batch_size)``, which both kinds provide.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_folder import ImageFolder

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """Train and test tensors; ``augment`` turns on random crops and flips for training."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    @property
    def train_size(self) -> int:
        return len(self.x_train)

    @property
    def test_size(self) -> int:
        return len(self.x_test)

    def train_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training examples ``idx`` as ``(x, y)``, augmented (:func:`augment_batch`,
        drawn from ``generator``) when the data set augments and a generator is given."""
        x = self.x_train[idx]
        if self.augment and generator is not None:
            x = augment_batch(x, generator)
        return x, self.y_train[idx]

    def test_batches(self, batch_size: int):
        """The test examples in order, ``batch_size`` at a time, as ``(x, y)``."""
        for i in range(0, len(self.x_test), batch_size):
            yield self.x_test[i:i + batch_size], self.y_test[i:i + batch_size]


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's digits as ``1x8x8`` images scaled to ``[0, 1]``, split 80/20 per class."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = idx.numel() // 5
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train, test = torch.cat(train_idx), torch.cat(test_idx)
    return Dataset("digits", x[train], y[train], x[test], y[test])


def grating_classes(orientations: int = 5) -> list[tuple[float, float]]:
    """The classes of a gratings task: (orientation in degrees, cycles per image), for
    ``orientations`` evenly spaced angles in [0, 180) at each of two frequencies."""
    return [(180 * i / orientations, freq) for freq in (1.5, 3.0) for i in range(orientations)]


def load_gratings(n_train: int = 4000, n_test: int = 1000, size: int = 16, noise: float = 1.3,
                  orientations: int = 5, seed: int = 0, name: str = "gratings") -> Dataset:
    """The ``gratings`` task: each image is ``contrast * cos(2π f (x cos θ + y sin θ) + φ)``
    for its class's orientation θ and frequency f (:func:`grating_classes`), plus a weaker
    distractor grating of a random class, plus Gaussian noise of standard deviation
    ``noise``. Deterministic for a given ``seed``; the test split comes from the same
    generator."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    table = torch.tensor(grating_classes(orientations), dtype=torch.float32)
    classes = torch.arange(n) % len(table)
    classes = classes[torch.randperm(n, generator=gen)]
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def grating(idx: torch.Tensor, jitter: float) -> torch.Tensor:
        angle = torch.deg2rad(table[idx, 0] + jitter * torch.randn(len(idx), generator=gen))
        freq = table[idx, 1] * (1 + 0.05 * torch.randn(len(idx), generator=gen))
        phase = 2 * torch.pi * torch.rand(len(idx), generator=gen)
        proj = xx * angle.cos().view(-1, 1, 1) + yy * angle.sin().view(-1, 1, 1)
        return torch.cos(2 * torch.pi * freq.view(-1, 1, 1) * proj + phase.view(-1, 1, 1))

    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, generator=gen)
    distractor = torch.randint(0, len(table), (n,), generator=gen)
    x = (contrast * grating(classes, 6.0) + 0.7 * grating(distractor, 6.0)
         + noise * torch.randn(n, size, size, generator=gen))
    x = x.unsqueeze(1)
    return Dataset(name, x[:n_train], classes[:n_train], x[n_train:], classes[n_train:])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from the python-format batches in ``data_dir``, normalised per channel."""
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 python batches not found in {root} (missing {', '.join(missing)}); "
            "dpf_ext never downloads data: unpack cifar-10-python.tar.gz there"
        )
    parts = [_read_cifar_batch(root / n) for n in names]
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def to_tensor(arrays):
        x = torch.from_numpy(np.concatenate([a for a, _ in arrays])).float() / 255.0
        y = torch.from_numpy(np.concatenate([b for _, b in arrays]))
        return (x - mean) / std, y

    x_train, y_train = to_tensor(parts[:5])
    x_test, y_test = to_tensor(parts[5:])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, augment=True)


DATASETS = ("digits", "gratings", "gratings20", "cifar10", "imagefolder")


def load_dataset(name: str, data_dir: str | Path | None = None):
    """Load one of :data:`DATASETS` (``cifar10`` and ``imagefolder`` need ``data_dir``)."""
    if name == "digits":
        return load_digits()
    if name == "gratings":
        return load_gratings()
    if name == "gratings20":
        return load_gratings(orientations=10, name=name)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--data cifar10 needs --data-dir DIR holding the python batches")
        return load_cifar10(data_dir)
    if name == "imagefolder":
        if data_dir is None:
            raise ValueError("--data imagefolder needs --data-dir ROOT holding train/ and val/")
        return ImageFolder(data_dir)
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out
