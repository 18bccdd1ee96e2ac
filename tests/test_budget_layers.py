"""Layer discovery, SEB weights and exact global budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mp_plugin import InvalidSparsityError, LayerSelection, find_target_layers
from mp_plugin.budget.rules import BUDGET_METHODS, SEBConfig, seb_layer_weights
from mp_plugin.errors import ConfigError, InvalidWeightError
from mp_plugin.layers.discovery import classify_layer_type
from mp_plugin.layers.patterns import Pattern, PatternError, round_budget_to_pattern
from mp_plugin.masks.counts import global_prune_counts, prune_target, uniform_prune_counts


class TinyViTBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, 4 * d)
        self.mlp.fc2 = nn.Linear(4 * d, d)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.blocks = nn.ModuleList([TinyViTBlock(), TinyViTBlock()])
        self.shared = self.blocks[0].mlp.fc1  # the same module reachable twice
        self.tied = nn.Linear(16, 64)
        self.tied.weight = self.blocks[1].mlp.fc1.weight  # a tied weight in another module
        self.head = nn.Linear(16, 10)


def test_layer_discovery_types_exclusions_and_sharing() -> None:
    targets, skipped = find_target_layers(TinyNet())
    names = [t.name for t in targets]
    assert names == [
        "pw",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    qkv = targets[1]
    assert qkv.shape == (48, 16) and qkv.layer_type == "attn"  # fused qkv is one matrix
    assert targets[3].layer_type == "mlp" and targets[0].layer_type == "other"
    assert targets[0].shape == (32, 16)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["stem"].startswith("stem conv")
    assert reasons["dw"] == "grouped/depthwise conv"
    assert reasons["head"] == "classifier head"
    assert "shares its weight" in reasons["tied"]
    assert "tied" in targets[7].aliases


def test_selection_is_configurable() -> None:
    sel = LayerSelection(exclude_stem=False, exclude_head=False, exclude_grouped=False, exclude=[r"attn"])
    names = [t.name for t in find_target_layers(TinyNet(), sel)[0]]
    assert "stem" in names and "head" in names and "dw" in names
    assert not any("attn" in n for n in names)
    only = LayerSelection(include_only=[r"mlp\.fc2"])
    assert [t.name for t in find_target_layers(TinyNet(), only)[0]] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.3.attn.qkv", "attn"),
        ("encoder.layer.0.attention.self.query", "attn"),
        ("encoder.layer.0.attention.output.dense", "attn"),
        ("encoder.layer.0.intermediate.dense", "mlp"),
        ("encoder.layer.0.output.dense", "mlp"),
        ("stages.1.blocks.0.mlp.fc1", "mlp"),
        ("layer1.0.conv1", "other"),
        ("pooler.dense", "other"),
    ],
)
def test_classify_layer_type(name: str, expected: str) -> None:
    assert classify_layer_type(name) == expected


def test_seb_weights_follow_regime_table() -> None:
    signals = [1.0, 2.0, 3.0, 4.0]
    types = ["attn", "mlp", "other", "mlp"]
    w, z = seb_layer_weights(signals, types, 0.2)
    assert np.all(w == 1.0)  # s < 0.30: plain global magnitude
    np.testing.assert_allclose(z, (np.array(signals) - 2.5) / np.std(signals))
    w, _ = seb_layer_weights(signals, types, 0.35)  # β=1, s_d=0.5
    np.testing.assert_allclose(w, np.maximum(0.1, 1 + 1.0 * (1 - 0.35 / 0.5) * z))
    w, _ = seb_layer_weights(signals, types, 0.65)  # layer-type β, s_d=0.85
    betas = np.array([1.0, 2.0, 1.25, 2.0])
    np.testing.assert_allclose(w, np.maximum(0.1, 1 + betas * (1 - 0.65 / 0.85) * z))
    assert np.all(np.diff(w[[1, 3]]) > 0)  # higher σ₊ → larger w → more pruning
    rev, _ = seb_layer_weights(signals, types, 0.65, SEBConfig(direction=-1.0))
    assert rev[3] < rev[1]


def test_seb_weight_floor_and_nan_signals() -> None:
    w, z = seb_layer_weights([0.0, 0.0, 0.0, 100.0, float("nan")], ["mlp"] * 5, 0.6)
    assert w.min() >= 0.1 - 1e-12
    assert z[-1] == 0.0


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.731, 0.99])
def test_global_counts_hit_sparsity_exactly(sparsity: float) -> None:
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(33, 17, generator=g), torch.randn(64, 8, generator=g), torch.randn(5, 3, 2, 2, generator=g)]
    weights[1][:4] = 0.0  # ties at zero
    total = sum(w.numel() for w in weights)
    for lw in ([1.0, 1.0, 1.0], [0.5, 2.0, 1.0]):
        counts = global_prune_counts(weights, lw, sparsity)
        assert sum(counts) == prune_target(sparsity, total)
    uni = uniform_prune_counts(weights, sparsity)
    assert sum(uni) == prune_target(sparsity, total)
    assert all(abs(c / w.numel() - sparsity) <= 1 / w.numel() + 1e-12 for c, w in zip(uni, weights))


def test_prune_target_is_the_floor_of_s_times_total_with_float_products_read_exactly() -> None:
    assert [prune_target(s, 10) for s in (0.0, 0.3, 0.35, 0.7, 0.99)] == [0, 3, 3, 7, 9]
    assert prune_target(0.9999, 512) == 511  # below 1: never every weight of a small model
    assert prune_target(0.6, 2048) == 1228 and prune_target(0.1, 3 * 10**11) == 3 * 10**10
    assert all(prune_target(k / 100, 100) == k for k in range(100))  # k/100 · 100 is k, whatever the float


@pytest.mark.parametrize(
    "kwargs", [{"min_weight": 0}, {"min_weight": -0.5}, {"direction": float("nan")}, {"power": -1.0}]
)
def test_seb_config_refuses_settings_that_break_the_score(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="SEBConfig"):
        SEBConfig(**kwargs)


def test_global_counts_refuse_bad_layer_weights_and_non_finite_weights() -> None:
    w = [torch.randn(8, 8), torch.randn(8, 8)]
    for lw in ([1.0, float("inf")], [1.0, 0.0], [1.0, -1.0], [1.0, float("nan")]):
        with pytest.raises(ConfigError, match="finite and > 0"):
            global_prune_counts(w, lw, 0.5)
    with pytest.raises(ConfigError, match="1 layer weights for 2"):
        global_prune_counts(w, [1.0], 0.5)
    w[1][2, 3] = float("nan")
    with pytest.raises(InvalidWeightError, match="weight 1 .* NaN"):
        global_prune_counts(w, [1.0, 1.0], 0.5)


def test_a_nan_weight_is_refused_when_the_fits_are_reused() -> None:
    import mp_plugin as mp

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    first = mp.plan(model, 0.5, "unstructured")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightError, match="NaN"):
        mp.plan(model, 0.5, "unstructured", reuse_fits=first)  # no refit, the counts still see it


def test_a_huge_bulk_share_beta_is_refused_instead_of_saving_an_unloadable_plan() -> None:
    import mp_plugin as mp
    from mp_plugin.budget.bulk_share import BulkShareConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48)
    )
    with torch.no_grad():
        model[0].weight += 0.5 * torch.randn(96, 1) @ torch.randn(1, 64)  # spikes: the layers' z differ
    cfg = mp.PlanConfig(bulk_share=BulkShareConfig(beta=1000.0))
    with pytest.raises(ConfigError, match="finite and > 0"):
        mp.plan(model, 0.5, "unstructured", "mp-bulk", config=cfg)


def test_a_fit_without_its_zero_rows_is_reused() -> None:
    import mp_plugin as mp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight[:8] = 0.0  # 8 dead rows: the fit is 56×64
    first = mp.plan(model, 0.5, "unstructured")
    assert first.layers[0].fit.shape == (56, 64)
    again = mp.plan(model, 0.6, "unstructured", reuse_fits=first)
    assert again.layers[0].fit is first.layers[0].fit  # the same object: not refitted


def test_higher_layer_weight_prunes_more() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(100, 100, generator=g), torch.randn(100, 100, generator=g)
    even = global_prune_counts([a, b], [1.0, 1.0], 0.5)
    tilted = global_prune_counts([a, b], [1.0, 2.0], 0.5)
    assert tilted[1] > even[1] and tilted[0] < even[0]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_impossible_sparsity(bad) -> None:
    with pytest.raises(InvalidSparsityError):
        global_prune_counts([torch.ones(4, 4)], [1.0], bad)


def test_patterns_parse_and_round() -> None:
    assert Pattern.parse("2:4").sparsity == 0.5 and Pattern.parse("2:4").hardware
    assert not Pattern.parse("8:16").hardware
    assert Pattern.parse("12:16").sparsity == 0.25
    for bad in ("4:4", "5:4", "2:32", "abc", "0:4"):
        with pytest.raises(PatternError):
            Pattern.parse(bad)
    assert not Pattern.parse("2:4").eligible((8, 6))
    assert str(round_budget_to_pattern(0.05, (8, 16))) == "dense"
    assert str(round_budget_to_pattern(0.3, (8, 16))) == "12:16"
    assert str(round_budget_to_pattern(0.6, (8, 16))) == "2:4"
    assert str(round_budget_to_pattern(0.6, (8, 6))) == "dense"  # nothing eligible


def test_registry_has_baselines() -> None:
    assert {"seb", "seb-hill", "magnitude", "uniform"} <= set(BUDGET_METHODS)
