"""Real data sets that ship offline (Debian packages), parsed without extra dependencies."""

from .fashion_mnist import CLASSES, FashionMNIST, load_fashion_mnist

__all__ = ["CLASSES", "FashionMNIST", "load_fashion_mnist"]
