"""MAC accounting: dense vs k:n, only layers that really satisfy the pattern, any callable."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp

from mp_plugin.masks.macs import count_macs, mac_table, sparse_factor
from mp_plugin.masks.select import magnitude_kn_


def _prune(model: torch.nn.Module, k: int = 2, n: int = 4, only: int | None = None) -> list[str]:
    return magnitude_kn_(model, k, n, limit=only)


def test_linear_macs_exact():
    mlp = make_mlp((32, 64, 64, 10))
    mc = count_macs(mlp, (5, 32))
    assert mc.dense == 5 * (32 * 64 + 64 * 64 + 64 * 10)
    assert mc.sparse == mc.dense  # nothing pruned yet


def test_24_model_saves_half_of_pruned_layer_macs():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    dense = count_macs(model, (2, 3, 32, 32))
    names = _prune(model)
    mc = count_macs(model, (2, 3, 32, 32), "2:4")
    pruned = sum(lm.dense for lm in mc.layers if lm.name in names)
    assert pruned > 0.5 * mc.dense
    assert mc.dense == dense.dense
    assert mc.sparse == pytest.approx(dense.dense - pruned / 2)
    assert mc.attention == 2 * 2 * 3 * 17 * 17 * 128  # depth · batch · heads · L² · (E + Ev)


def test_only_layers_that_satisfy_the_pattern_are_discounted():
    mlp = make_mlp((32, 64, 64, 10))
    _prune(mlp, only=1)  # first Linear only; the head is not a target anyway
    mc = count_macs(mlp, (4, 32), "2:4")
    assert [lm.pattern for lm in mc.layers] == ["2:4", "dense", "dense"]
    assert mc.sparse == mc.dense - 4 * 32 * 64 / 2
    assert sparse_factor(mlp[0].weight, "1:4") == ("dense", 1.0)
    assert sparse_factor(mlp[0].weight, "auto")[1] == 0.5


def test_conv_model_and_table():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=10).eval()
    _prune(model)
    table = mac_table(model, (1, 3, 32, 32), "2:4", "12:16", "1:4")
    lines = table.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["dense", "2:4", "12:16", "1:4"]
    ratio = {ln.split()[0]: float(ln.split()[2]) for ln in lines[1:]}
    assert 0.5 < ratio["2:4"] < 0.6  # stem conv and head stay dense
    assert ratio["2:4"] < ratio["12:16"] < 1.0  # 2:4 weights also satisfy 12:16, counted at 12/16
    assert ratio["1:4"] == 1.0  # not satisfied → no discount


def test_any_callable_is_measured():
    mlp = make_mlp((32, 64, 64, 10))
    _prune(mlp)

    def half_batch_forward(x: torch.Tensor) -> torch.Tensor:  # stands in for a token-reducing (ToMe) patch
        return mlp(x[: x.shape[0] // 2])

    full = count_macs(mlp, (8, 32))
    half = count_macs(half_batch_forward, (8, 32), modules=mlp)
    assert half.dense * 2 == full.dense
    assert half.sparse * 2 == pytest.approx(full.sparse)
