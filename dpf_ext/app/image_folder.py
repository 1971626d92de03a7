"""Images in class folders on disk (ImageNet's layout), read batch by batch as training
needs them: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``. Decoded with
Pillow in a pool of threads; training crops are ImageNet's random-resized crops with
flips, drawn from the training generator (so runs are reproducible and resume exactly);
evaluation resizes the shorter side and takes the centre crop."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
ATTEMPTS = 10
"""Random-resized-crop tries per image before the centre-crop fallback."""


def _listing(folder: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():  # a class without validation images
            continue
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in EXTENSIONS:
                files.append(path)
                labels.append(label)
    return files, torch.tensor(labels, dtype=torch.int64)


def random_resized_box(width: int, height: int, draws: list[float],
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The crop box ``(left, top, right, bottom)`` of ImageNet's random-resized crop: an area
    of ``scale`` times the image's and an aspect ratio in ``ratio`` (log-uniform), from four
    uniform draws per attempt (``draws``: ``4 * ATTEMPTS`` numbers in [0, 1)); the largest
    centred box within ``ratio`` when no attempt fits."""
    area = width * height
    for a in range(ATTEMPTS):
        u_area, u_ratio, u_top, u_left = draws[4 * a:4 * a + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))
            left = int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageFolder:
    """The ``imagefolder`` data set (``--data imagefolder --data-dir ROOT``): the same
    interface as :class:`dpf_ext.app.data.Dataset` (``train_batch``, ``test_batches``), images
    read from disk. ``size``: the side of the training and evaluation crops; ``resize``: the
    shorter side before evaluation's centre crop; ``threads``: decoding threads."""

    name = "imagefolder"

    def __init__(self, root: str | Path, size: int = 224, resize: int = 256, threads: int = 8):
        root = Path(root)
        train, val = root / "train", root / "val"
        if not train.is_dir() or not val.is_dir():
            raise FileNotFoundError(
                f"--data imagefolder: {root} needs train/<class>/ and val/<class>/ folders of "
                "images (ImageNet's layout; dpf_ext never downloads data)")
        self.classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        unknown = sorted(p.name for p in val.iterdir() if p.is_dir() and p.name not in self.classes)
        if not self.classes or unknown:
            raise ValueError(f"--data imagefolder: {root}: "
                             + (f"val/ has classes train/ lacks: {unknown[:5]}" if unknown
                                else "train/ has no class folders"))
        self.train_files, self.y_train = _listing(train, self.classes)
        self.test_files, self.y_test = _listing(val, self.classes)
        if not self.train_files or not self.test_files:
            raise ValueError(f"--data imagefolder: {root}: no images in train/ or val/ "
                             f"(extensions {', '.join(EXTENSIONS)})")
        self.size, self.resize, self.threads = size, resize, threads
        self._pool: ThreadPoolExecutor | None = None
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train_files)

    @property
    def test_size(self) -> int:
        return len(self.test_files)

    def _tensor(self, image) -> torch.Tensor:
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = pixels.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return (x - self._mean) / self._std

    def _train_image(self, path: Path, draws: list[float]) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as f:
            image = f.convert("RGB")
        box = random_resized_box(image.width, image.height, draws[:-1])
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if draws[-1] < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self._tensor(image)

    def _test_image(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as f:
            image = f.convert("RGB")
        scale = self.resize / min(image.width, image.height)
        image = image.resize((max(self.resize, round(image.width * scale)),
                              max(self.resize, round(image.height * scale))), Image.BILINEAR)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return self._tensor(image.crop((left, top, left + self.size, top + self.size)))

    def _map(self, fn, *items) -> torch.Tensor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        return torch.stack(list(self._pool.map(fn, *items)))

    def train_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images ``idx``: random-resized crops and flips drawn from
        ``generator``, or evaluation's centre crops without one."""
        files = [self.train_files[i] for i in idx.tolist()]
        if generator is None:
            return self._map(self._test_image, files), self.y_train[idx]
        draws = torch.rand(len(files), 4 * ATTEMPTS + 1, generator=generator, dtype=torch.float64)
        return self._map(self._train_image, files, draws.tolist()), self.y_train[idx]

    def test_batches(self, batch_size: int):
        """The validation images in order, ``batch_size`` at a time, as ``(x, y)``."""
        for i in range(0, len(self.test_files), batch_size):
            yield (self._map(self._test_image, self.test_files[i:i + batch_size]),
                   self.y_test[i:i + batch_size])
