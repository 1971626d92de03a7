"""The ``imagefolder`` data set: ImageNet's random-resized crop by hand, reading class
folders of images of any size, deterministic batches, training through it, clear errors."""

import numpy as np
import pytest
import torch

from dpf_ext.app.cli import main
from dpf_ext.app.image_folder import ATTEMPTS, ImageFolder, random_resized_box
from dpf_ext.app.train import TrainConfig, train

Image = pytest.importorskip("PIL.Image")


def test_random_resized_box_by_hand():
    # area 0.08 + 0.92 * 0.5 = 0.54 of 100x100, ratio exp(0) = 1: a 73x73 box at 14
    assert random_resized_box(100, 100, [0.5] * (4 * ATTEMPTS)) == (14, 14, 87, 87)
    # no attempt fits a 10x1000 image: the centred box at the closest ratio (3/4)
    assert random_resized_box(10, 1000, [1.0 - 1e-9, 0.0, 0.5, 0.5] * ATTEMPTS) == (0, 493, 10, 506)
    # the whole image at scale 1 and ratio 1 of a square
    assert random_resized_box(64, 64, [1.0, 0.5, 0.0, 0.0] * ATTEMPTS) == (0, 0, 64, 64)


def _write_folder(root, classes=3, train=4, val=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(24, 60, size=2)
                pixels = np.full((h, w, 3), 60 * c, dtype=np.uint8)
                pixels += rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    return root


def test_reads_class_folders_in_order_and_batches_are_deterministic(tmp_path):
    data = ImageFolder(_write_folder(tmp_path), size=32, resize=36, threads=2)
    assert data.classes == ["class0", "class1", "class2"] and data.num_classes == 3
    assert (data.train_size, data.test_size, data.input_shape) == (12, 6, (3, 32, 32))
    assert data.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    idx = torch.tensor([5, 0, 11])
    x, y = data.train_batch(idx, torch.Generator().manual_seed(3))
    again, _ = data.train_batch(idx, torch.Generator().manual_seed(3))
    other, _ = data.train_batch(idx, torch.Generator().manual_seed(4))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [1, 0, 2]
    assert torch.equal(x, again) and not torch.equal(x, other)
    plain, _ = data.train_batch(idx)  # no generator: evaluation's centre crops
    assert torch.equal(plain, data.train_batch(idx)[0])
    # the class's grey level survives normalisation: class 2 is brighter than class 0
    assert plain[2].mean() > plain[1].mean()
    batches = list(data.test_batches(4))
    assert [len(b[1]) for b in batches] == [4, 2] and batches[1][1].tolist() == [2, 2]


def test_trains_through_the_image_folder(tmp_path):
    data = ImageFolder(_write_folder(tmp_path), size=32, resize=36, threads=2)
    config = TrainConfig(method="dpf", model="cnn", sparsity=0.5, epochs=2, batch_size=4, seed=0)
    first, second = train(config, data, progress=False), train(config, data, progress=False)
    assert 0.0 <= first.accuracy <= 1.0 and first.sparsity == pytest.approx(0.5, abs=0.01)
    assert (first.accuracy, first.history) == (second.accuracy, second.history)


def test_bad_folders_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="needs train/<class>/ and val/<class>/"):
        ImageFolder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"val/ has classes train/ lacks: \['b'\]"):
        ImageFolder(tmp_path)
    (tmp_path / "val" / "b").rmdir()
    with pytest.raises(ValueError, match="no images in train/ or val/"):
        ImageFolder(tmp_path)
    with pytest.raises(SystemExit):
        main(["--data", "imagefolder", "--model", "cnn"])
    assert "--data imagefolder needs --data-dir" in capsys.readouterr().err
