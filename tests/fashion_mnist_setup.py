"""Test helper: the real Fashion-MNIST from Debian's package, else a skip.

The tests never install anything: ``bash run.sh test`` installs ``dataset-fashion-mnist``
(apt, when usable) before running them.
"""

from __future__ import annotations

import pytest

from mp_plugin.errors import DatasetUnavailable
from mp_plugin.evaluation.fashion_mnist import APT_PACKAGE, FashionMNIST, load_fashion_mnist


def fashion_mnist_or_skip() -> tuple[FashionMNIST, FashionMNIST]:
    """(train, test) splits, or a skip naming what is missing (``bash run.sh test`` installs it)."""
    try:
        return load_fashion_mnist("train"), load_fashion_mnist("test")
    except DatasetUnavailable as exc:
        pytest.skip(f"real Fashion-MNIST unavailable ({exc}); `bash run.sh test` installs {APT_PACKAGE}")
