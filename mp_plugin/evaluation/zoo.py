"""Small networks trained here on the real Fashion-MNIST: honest "real trained networks".

Three architectures, each with a fixed seed and a fixed recipe (this file is the
source; no weights ship in the repository):

=============  ==========================================================  =====================
name           architecture                                                 CPU time (2 cores)
=============  ==========================================================  =====================
fmnist_mlp     784 → 512 → 256 → 10, ReLU                                   ~25 s
fmnist_cnn     conv3×3(16) → pool → conv3×3(32) → pool → 1568 → 128 → 10    ~90 s
fmnist_vit     4×4 patches (49 tokens + cls), width 64, depth 4, 4 heads    ~4 min
=============  ==========================================================  =====================

:func:`trained_model` trains a network on first use and caches its state_dict in
``$MP_PLUGIN_CACHE`` (default ``~/.cache/mp-plugin``) under ``zoo/``, keyed by a
hash of the recipe, so a changed recipe retrains. ``mp_plugin.evaluation.models`` registers
the three names (``ZOO_NAMES``) with factories that import this module only when
``load_model("fmnist_mlp")`` etc. is called, so loading any other model does not
pull in the trainer or the data reader.
Inputs are (B, 1, 28, 28) floats in [0, 1]; outputs are (B, 10) logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.classifier_training import TrainConfig, accuracy, train_classifier
from mp_plugin.evaluation.fashion_mnist import load_fashion_mnist

__all__ = ["ZOO", "TinyViT", "build_model", "cache_dir", "trained_model", "zoo_record"]

_RECIPE_VERSION = 1


class _Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); (B, T, D) → (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small Vision Transformer for (B, 1, 28, 28) images: 4×4 patches, a cls token, learned positions."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, kernel_size=4, stride=4)  # → (B, D, 7, 7)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 50, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 49, D)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@dataclass(frozen=True)
class ZooEntry:
    """One zoo network: its constructor, training recipe and initialisation seed."""

    build: Callable[[], nn.Module]
    recipe: TrainConfig
    init_seed: int = 0


ZOO: dict[str, ZooEntry] = {
    "fmnist_mlp": ZooEntry(_mlp, TrainConfig(epochs=2, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=1e-4)),
    "fmnist_cnn": ZooEntry(_cnn, TrainConfig(epochs=2, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=1e-4)),
    "fmnist_vit": ZooEntry(
        TinyViT, TrainConfig(epochs=2, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.05)
    ),
}


def cache_dir() -> Path:
    """``$MP_PLUGIN_CACHE`` or ``~/.cache/mp-plugin``: where trained zoo weights live (never the repo)."""
    env = os.environ.get("MP_PLUGIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mp-plugin"


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise MPPluginError(f"unknown zoo model {name!r}; choose from {sorted(ZOO)}")
    return ZOO[name]


def build_model(name: str) -> nn.Module:
    """The untrained network ``name`` at its fixed initialisation seed (for init-vs-trained comparisons)."""
    entry = _entry(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.init_seed)
        return entry.build()


def _key(name: str) -> str:
    entry = _entry(name)
    text = json.dumps({"v": _RECIPE_VERSION, "name": name, "recipe": asdict(entry.recipe), "seed": entry.init_seed})
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _paths(name: str, root: Path | None) -> tuple[Path, Path]:
    base = (root or cache_dir()) / "zoo"
    stem = f"{name}-{_key(name)}"
    return base / f"{stem}.pt", base / f"{stem}.json"


def zoo_record(name: str, root: Path | None = None) -> dict | None:
    """The cached training record (test accuracy, seconds, threads) of ``name``, or None if not trained yet."""
    meta = _paths(name, root)[1]
    return json.loads(meta.read_text()) if meta.exists() else None


def trained_model(
    name: str, root: str | Path | None = None, retrain: bool = False, show_progress: bool = False
) -> nn.Module:
    """Return zoo network ``name`` trained on Fashion-MNIST train (eval mode), training it on first use.

    Args:
        name: ``"fmnist_mlp"``, ``"fmnist_cnn"`` or ``"fmnist_vit"``.
        root: cache directory (default :func:`cache_dir`).
        retrain: ignore the cache and train again.
        show_progress: tqdm bar while training.

    Raises:
        MPPluginError: unknown name; :class:`~mp_plugin.errors.DatasetUnavailable` when the data are missing.
    """
    entry = _entry(name)
    weights, meta = _paths(name, Path(root) if root is not None else None)
    model = build_model(name)
    if weights.exists() and not retrain:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    t0 = time.perf_counter()
    train_classifier(model, train.images, train.labels, entry.recipe, show_progress=show_progress)
    seconds = time.perf_counter() - t0
    record = {
        "name": name,
        "test_accuracy": accuracy(model, test.images, test.labels),
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "recipe": asdict(entry.recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(weights)
    meta.write_text(json.dumps(record, indent=1))
    return model.eval()
