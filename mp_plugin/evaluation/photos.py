"""Real photos for calibration and checks, offline: ImageFolder directories and built-in crops.

``builtin-photos`` are random crops (scale, aspect ratio, flip) of the photograph
that ships with matplotlib (``mpl-data/sample_data/grace_hopper.jpg``), resized
to the model's input size. Images are normalised with ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mp_plugin.errors import DataError, MPPluginError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "builtin_photo_path",
    "builtin_photo_crops",
    "builtin_photo_paths",
    "real_photo_crops",
    "image_folder_batch",
    "load_images",
    "normalise_imagenet",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def builtin_photo_path() -> Path:
    """Path of matplotlib's sample photograph (grace_hopper.jpg)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MPPluginError("builtin-photos needs matplotlib: pip install 'mp-plugin[plot]'") from exc
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.exists():
        raise MPPluginError(f"matplotlib's sample photo is missing: {path}")
    return path


_SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)


def builtin_photo_paths() -> list[Path]:
    """Every real colour photograph shipped offline: matplotlib's, plus scikit-image's when installed."""
    paths = [builtin_photo_path()]
    try:
        import skimage
    except ImportError:
        return paths
    data = Path(skimage.__file__).parent / "data"
    return paths + [data / name for name in _SKIMAGE_PHOTOS if (data / name).exists()]


def real_photo_crops(n: int, size: int = 224, seed: int = 0, min_scale: float = 0.15) -> torch.Tensor:
    """``n`` random crops spread over all :func:`builtin_photo_paths`: (n, 3, size, size), normalised.

    Crop i comes from photo i mod P, with the same crop rules as :func:`builtin_photo_crops`.
    """
    paths = builtin_photo_paths()
    check_image_size(size)
    if n < 1:
        raise MPPluginError(f"need at least one crop, got n={n}")
    parts = []
    for j, path in enumerate(paths):
        count = len(range(j, n, len(paths)))
        if count:
            parts.append(_crops_of(_read_rgb(path), count, size, seed + 7919 * j, min_scale))
    x = torch.cat(parts)
    order = torch.argsort(torch.rand(len(x), generator=torch.Generator().manual_seed(seed)))
    return normalise_imagenet(x[order])


def _read_rgb(path: Path) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as exc:
        raise MPPluginError("reading images needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncated or broken files
        raise DataError(f"image {path} cannot be read ({type(exc).__name__}: {exc}); remove or replace it") from exc
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"image {path} has no pixels (shape {arr.shape})")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W) in [0, 1]


def normalise_imagenet(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] → normalised with ImageNet mean/std (same shape)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def builtin_photo_crops(n: int, size: int = 224, seed: int = 0, min_scale: float = 0.15) -> torch.Tensor:
    """``n`` random crops of the built-in photo: (n, 3, size, size) float32, ImageNet-normalised.

    Each crop covers a fraction in [min_scale, 1] of the photo's area with aspect ratio in
    [3/4, 4/3], is flipped horizontally with probability ½, and is resized bilinearly.
    """
    if n < 1:
        raise MPPluginError(f"need at least one crop, got n={n}")
    check_image_size(size)
    return normalise_imagenet(_crops_of(_read_rgb(builtin_photo_path()), n, size, seed, min_scale))


def _crops_of(img: torch.Tensor, n: int, size: int, seed: int, min_scale: float) -> torch.Tensor:
    """Random resized crops of one (3, H, W) image in [0, 1]: (n, 3, size, size), not normalised."""
    _, h, w = img.shape
    g = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(n):
        scale = min_scale + (1 - min_scale) * float(torch.rand((), generator=g))
        ratio = float(torch.exp(torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g)))
        ch = int(round(min(h, np.sqrt(scale * h * w / ratio))))
        cw = int(round(min(w, ch * ratio)))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if float(torch.rand((), generator=g)) < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.cat(crops)


def image_folder_batch(
    root: str | Path, n: int | None = None, size: int = 224
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images of an ImageFolder tree (``root/<class>/<img>``) or a flat folder, centre-cropped.

    Returns:
        (x, labels): x (N, 3, size, size) ImageNet-normalised; labels (N,) when every class
        folder is named by an integer class index, else None.
    """
    root = Path(root)
    check_image_size(size)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"number of images must be a positive integer, got {n!r}")
    if not root.is_dir():
        raise MPPluginError(f"{root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _EXTS)
    if not files:
        raise MPPluginError(f"no images ({', '.join(sorted(_EXTS))}) under {root}")
    files = files[:n] if n else files
    parents = [p.parent.name for p in files]
    labels = torch.tensor([int(c) for c in parents]) if all(c.isdigit() for c in parents) else None
    return load_images(files, size), labels


def check_image_size(size: int) -> int:
    """``size`` as a positive int, or :class:`~mp_plugin.errors.DataError`."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {size!r}")
    return int(size)


def load_images(files: list[Path], size: int = 224) -> torch.Tensor:
    """Resize the short side to size·8/7, centre-crop size×size, normalise: (N, 3, size, size)."""
    size = check_image_size(size)
    out = []
    for path in files:
        img = _read_rgb(path).unsqueeze(0)
        _, _, h, w = img.shape
        short = int(round(size * 8 / 7))
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(img[:, :, top : top + size, left : left + size])
    return normalise_imagenet(torch.cat(out))
