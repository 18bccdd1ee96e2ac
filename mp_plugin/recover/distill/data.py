"""The distillation recipe's data settings and loaders, framework-free.

:class:`DataConfig` says how images are read and augmented; :class:`Loaders` is what a
loader builder returns. The builder for image folders through timm's pipeline is
:func:`mp_plugin.integrations.timm.make_loaders`; any other pair of DataLoaders works too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

__all__ = ["DataConfig", "Loaders", "model_num_classes", "count_images", "split_dirs", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class DataConfig:
    """How images are read and augmented.

    Attributes:
        input_size: (3, H, W) override of the model's input size (None = the model's ``pretrained_cfg``).
        auto_augment: timm auto-augment string (spec: RandAugment m9); None = off.
        re_prob: RandomErasing probability (spec: 0.25).
        hflip: horizontal flip probability.
        no_aug: training transform without augmentation (resize + centre crop only).
        val_fraction: share of images held out when the directory has no ``val/``.
        num_workers: DataLoader workers.
        split_seed: seed of the one-folder train/val split.
        extra: further keyword arguments for ``timm.data.create_transform``.
    """

    input_size: tuple[int, int, int] | None = None
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    hflip: float = 0.5
    no_aug: bool = False
    val_fraction: float = 0.1
    num_workers: int = 0
    split_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loaders:
    """What a loader builder (:func:`mp_plugin.integrations.timm.make_loaders`) returns.

    Attributes:
        train, val: the DataLoaders (``val`` None when there is nothing to validate on).
        num_classes: classes found in the training split.
        class_to_idx: folder name → label index.
        data_config: timm's resolved data config (input_size, mean, std, crop_pct, …).
        train_sampler: the DistributedSampler under DDP (call ``set_epoch``), else None.
    """

    train: DataLoader
    val: DataLoader | None
    num_classes: int
    class_to_idx: dict[str, int]
    data_config: dict[str, Any]
    train_sampler: Any = None


def model_num_classes(model: nn.Module) -> int | None:
    """Output classes of ``model``: timm's ``num_classes``, else the last Linear's ``out_features``."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return None if last is None else int(last.out_features)


def count_images(root: Path) -> int:
    """Image files (by suffix) anywhere under ``root``."""
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def split_dirs(root: Path) -> tuple[Path, Path | None]:
    """(train, val) directories of an ImageNet-layout ``root``; (root, None) for one class-folder directory."""
    if (root / "train").is_dir():
        for name in ("val", "validation", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        return root / "train", None
    return root, None
