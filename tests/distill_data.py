"""Test helpers for the training side: tiny generated ImageFolder data and a small pruned CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def _pattern(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 image whose structure depends on the class."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.integers(4, 7)
    phase = rng.integers(0, period)
    if cls == 0:
        g = ((yy + phase) // (period // 2 + 1)) % 2  # horizontal stripes
    elif cls == 1:
        g = ((xx + phase) // (period // 2 + 1)) % 2  # vertical stripes
    elif cls == 2:
        g = ((xx + phase) // 4 + (yy + phase) // 4) % 2  # checkerboard
    else:
        g = ((xx + yy + phase) // (period // 2 + 1)) % 2  # diagonal stripes
    colour = np.array([60, 120, 200]) if cls % 2 else np.array([200, 90, 40])
    img = g[..., None] * colour[None, None, :] + rng.normal(0, 20, (size, size, 3)) + 30
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path, n_classes: int = 3, per_class: int = 24, size: int = 32, seed: int = 0, split: str | None = None
) -> Path:
    """Write ``root/[split/]class_k/img_i.png`` PNG files; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / split if split else root
    for c in range(n_classes):
        d = base / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_pattern(c, size, rng)).save(d / f"img_{i:03d}.png")
    return root


class SmallCNN(nn.Module):
    """Stem conv, three prunable convs, a prunable hidden Linear and a head: (B,3,H,W) → (B, num_classes)."""

    def __init__(self, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.conv1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, 4 * w)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.norm(self.conv3(x)))
        x = x.mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def pruned_cnn(sparsity: float = 0.5, num_classes: int = 3, seed: int = 0, method: str = "magnitude"):
    """(student, teacher, plan): a seeded SmallCNN pruned to ``sparsity`` and its dense copy."""
    import copy

    from mp_plugin.planning.build import plan
    from mp_plugin.pruning.apply_plan import apply

    torch.manual_seed(seed)
    teacher = SmallCNN(num_classes).eval()
    student = copy.deepcopy(teacher)
    p = plan(student, sparsity=sparsity, pattern="unstructured", method=method)
    apply(student, p)
    return student, teacher, p


def save_pruned_timm(folder: Path, name: str, num_classes: int = 3):
    """A timm model pruned to 50 % (global magnitude), written as ``dense.safetensors``,
    ``pruned.safetensors`` and ``plan.json`` in ``folder``; returns the plan."""
    import timm
    from safetensors.torch import save_file

    from mp_plugin.planning.build import plan
    from mp_plugin.pruning.apply_plan import apply

    torch.manual_seed(0)
    dense = timm.create_model(name, num_classes=num_classes).eval()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(folder / "dense.safetensors"))
    p = plan(dense, 0.5, "unstructured", "magnitude")
    apply(dense, p)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(folder / "pruned.safetensors"))
    p.save(folder / "plan.json")
    return p
