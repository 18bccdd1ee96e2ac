"""timm adapter: image folders to DataLoaders through timm's own data pipeline.

Layouts accepted (``DIR`` given to :func:`make_loaders`):

* ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``validation/``): ImageNet layout;
* ``DIR/<class>/*``: one folder, split deterministically (seeded) into train/val.

Transforms come from ``timm.data.resolve_data_config`` (the model's own input size,
mean/std, crop) and ``timm.data.create_transform``; datasets from
``timm.data.create_dataset``. Nothing here re-implements a timm transform. The
settings (:class:`~mp_plugin.recover.distill.data.DataConfig`) and the returned
:class:`~mp_plugin.recover.distill.data.Loaders` are the core's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mp_plugin.errors import MPPluginError
from mp_plugin.recover.distill.data import IMAGE_SUFFIXES, DataConfig, Loaders, count_images, split_dirs
from mp_plugin.recover.distill.dist import DistContext

__all__ = ["make_loaders"]


def _dataset(root: Path, transform: Any, class_map: dict[str, int] | None = None) -> Dataset:
    from timm.data import create_dataset

    ds = create_dataset("", root=str(root), search_split=False, class_map=class_map or "")
    ds.transform = transform
    return ds


def _class_to_idx(ds: Dataset) -> dict[str, int]:
    reader = getattr(ds, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    return dict(mapping) if mapping else {}


def make_loaders(
    data_dir: str | Path,
    model: nn.Module,
    batch_size: int,
    config: DataConfig | None = None,
    dist: DistContext | None = None,
    eval_batch_size: int | None = None,
) -> Loaders:
    """Train/val DataLoaders for ``model`` from an ImageFolder/ImageNet-layout directory.

    Args:
        data_dir: the directory (see the module docstring for layouts).
        model: the student; its ``pretrained_cfg`` (timm) sets input size, mean/std and crop.
        batch_size: images per step per process.
        config: :class:`DataConfig`.
        dist: a :class:`DistContext`; with world_size > 1 the train split is sharded
            by a ``DistributedSampler`` (and so is val, for a global mean later).
        eval_batch_size: batch size of the val loader (default ``2·batch_size``).

    Returns:
        :class:`Loaders`. Images are (B, 3, H, W) float32 normalised tensors; labels (B,) int64.

    Raises:
        MPPluginError: missing/empty directory, fewer than 2 classes, or a val split whose
            classes are not all in the train split.
    """
    try:
        from timm.data import create_transform, resolve_data_config
    except ImportError as exc:
        raise MPPluginError("distillation data needs timm: pip install 'mp-plugin[timm]'") from exc
    cfg = config or DataConfig()
    root = Path(data_dir)
    if not root.is_dir():
        raise MPPluginError(f"dataset directory {root} does not exist")
    train_dir, val_dir = split_dirs(root)
    n_train = count_images(train_dir)
    if n_train == 0:
        raise MPPluginError(f"dataset directory {train_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if val_dir is not None and count_images(val_dir) == 0:
        raise MPPluginError(f"validation directory {val_dir} holds no images")

    data_config = resolve_data_config({}, model=model)
    if cfg.input_size is not None:
        data_config["input_size"] = tuple(cfg.input_size)
    common = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std") if k in data_config}
    train_tf = create_transform(
        **common,
        is_training=True,
        no_aug=cfg.no_aug,
        auto_augment=None if cfg.no_aug else cfg.auto_augment,
        re_prob=0.0 if cfg.no_aug else cfg.re_prob,
        hflip=cfg.hflip,
        **cfg.extra,
    )
    eval_tf = create_transform(**common, is_training=False, crop_pct=data_config.get("crop_pct"))

    train_ds = _dataset(train_dir, train_tf)
    class_to_idx = _class_to_idx(train_ds)
    if len(class_to_idx) < 2:
        raise MPPluginError(f"{train_dir} has {len(class_to_idx)} class folder(s); need at least 2")
    if val_dir is not None:
        val_classes = {p.name for p in val_dir.iterdir() if p.is_dir()}
        unknown = sorted(val_classes - set(class_to_idx))
        if unknown:
            raise MPPluginError(f"validation classes {unknown[:5]} are not in the training split {train_dir}")
        val_ds: Dataset | None = _dataset(val_dir, eval_tf, class_map=class_to_idx)
    elif cfg.val_fraction > 0 and len(train_ds) >= 4:
        g = torch.Generator().manual_seed(cfg.split_seed)
        order = torch.randperm(len(train_ds), generator=g).tolist()
        n_val = max(1, int(round(cfg.val_fraction * len(order))))
        val_ds = Subset(_dataset(train_dir, eval_tf), order[:n_val])
        train_ds = Subset(train_ds, order[n_val:])
    else:
        val_ds = None

    ctx = dist or DistContext()
    sampler = ctx.sampler(train_ds, shuffle=True)
    train = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=False,
        persistent_workers=cfg.num_workers > 0,
    )
    val = None
    if val_ds is not None:
        val = DataLoader(
            val_ds,
            batch_size=eval_batch_size or 2 * batch_size,
            shuffle=False,
            sampler=ctx.sampler(val_ds, shuffle=False),
            num_workers=cfg.num_workers,
        )
    train.num_classes = len(class_to_idx)  # type: ignore[attr-defined]  # read by distill's class check
    return Loaders(train, val, len(class_to_idx), class_to_idx, data_config, sampler)
