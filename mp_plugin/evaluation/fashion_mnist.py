"""The real Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), read offline from Debian's package.

``apt-get install dataset-fashion-mnist`` puts the four IDX files (gzipped) in
``/usr/share/datasets/fashion-mnist``. This module parses them with numpy;
nothing is downloaded. Another directory holding the same four files (gzipped
or not) can be given with ``root=`` or the ``MP_PLUGIN_FASHION_MNIST``
environment variable.

Images come back as float32 tensors (N, 1, 28, 28) scaled to [0, 1], labels as
int64 tensors (N,) with values 0…9 (:data:`CLASSES` names them).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mp_plugin.errors import DatasetUnavailable

__all__ = [
    "APT_PACKAGE",
    "CLASSES",
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FashionMNIST",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "read_idx",
]

APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MP_PLUGIN_FASHION_MNIST"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) → numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class FashionMNIST:
    """One split: ``images`` (N, 1, 28, 28) float32 in [0, 1], ``labels`` (N,) int64 in 0…9."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> FashionMNIST:
        """A fixed random subset of ``n`` examples (all of them when n ≥ N)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return FashionMNIST(self.images[idx], self.labels[idx])


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally ``.gz``) into a numpy array of its stored shape and dtype.

    Raises:
        DatasetUnavailable: the file is truncated or not an IDX file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetUnavailable(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetUnavailable(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) < header + count * dtype.itemsize:
        raise DatasetUnavailable(f"{path} is truncated: header says {dims}, file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The directory to read: ``root``, else ``$MP_PLUGIN_FASHION_MNIST``, else Debian's path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetUnavailable(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install Debian's real data with "
        f"'apt-get install {APT_PACKAGE}', or point {ENV_VAR} (or root=) at a directory holding the four IDX files."
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> FashionMNIST:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000).
        root: directory of the IDX files; see :func:`fashion_mnist_root`.

    Returns:
        :class:`FashionMNIST` with images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64.

    Raises:
        DatasetUnavailable: files missing, unreadable, or inconsistent.
        ValueError: unknown split.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = fashion_mnist_root(root)
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_find(base, img_stem))
    labels = read_idx(_find(base, lbl_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
        raise DatasetUnavailable(f"{base}: images {images.shape} and labels {labels.shape} are not Fashion-MNIST")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetUnavailable(f"{base}: labels outside 0…9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return FashionMNIST(x, y)
