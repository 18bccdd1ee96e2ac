"""Calibration covariances and the CAST k:n projection."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mp_plugin import MPPluginError, PatternError
from mp_plugin.layers.calibration import GroupCovariance, calibration_loss, capture_covariances
from mp_plugin.masks.cast import CastConfig, cast_project, cast_source, kn_patterns
from mp_plugin.masks.select import kn_group_counts, nm_mask


def _random_cov(groups: int, n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(groups, n, 2 * n, generator=gen, dtype=torch.float64)
    return a @ a.transpose(1, 2) / (2 * n)


def _brute_force(u: torch.Tensor, cov: torch.Tensor, k: int, n: int, prior: torch.Tensor | None, alpha: float):
    """Loop over every row, group and pattern; the 'code' prior scale (mean cost of the patterns)."""
    rows, width = u.shape
    out = torch.zeros(rows, width, dtype=torch.bool)
    pats = list(itertools.combinations(range(n), k))
    for i in range(rows):
        for g in range(width // n):
            ug = u[i, g * n : (g + 1) * n].double()
            costs = []
            for p in pats:
                m = torch.zeros(n, dtype=torch.bool)
                m[list(p)] = True
                r = torch.where(m, 0.0, ug)
                costs.append(float(r @ cov[g] @ r))
            cbar = sum(costs) / len(costs)
            best, best_val = None, math.inf
            for p, c in zip(pats, costs):
                val = c
                if alpha:
                    pm = prior[i, g * n : (g + 1) * n]
                    ham = sum(int((j in p) != bool(pm[j])) for j in range(n))
                    val += alpha * cbar * ham
                if val < best_val - 1e-12:
                    best, best_val = p, val
            out[i, [g * n + j for j in best]] = True
    return out


@pytest.mark.parametrize("k,n,alpha", [(2, 4, 0.0), (1, 3, 0.0), (3, 6, 0.0), (2, 4, 0.7), (4, 8, 0.3)])
def test_cast_matches_brute_force(k: int, n: int, alpha: float) -> None:
    gen = torch.Generator().manual_seed(k * 100 + n)
    rows, groups = 5, 3
    u = torch.randn(rows, groups * n, generator=gen)
    cov = _random_cov(groups, n, gen)
    prior = torch.rand(rows, groups * n, generator=gen) > 0.5
    stats = GroupCovariance(cov, rows=100, n=n)
    cfg = CastConfig(prior_alpha=alpha)
    mask = cast_project(u, stats, k, n, prior_mask=prior if alpha else None, config=cfg)
    expected = _brute_force(u, cov, k, n, prior, alpha)
    assert torch.equal(mask, expected)


def test_kn_patterns_enumerated_and_sampled() -> None:
    assert kn_patterns(2, 4).shape == (6, 4)
    assert kn_patterns(6, 12).shape == (924, 12)
    sampled = kn_patterns(8, 16, n_samples=1024, generator=torch.Generator().manual_seed(0))
    assert 900 < sampled.shape[0] <= 1024  # 12 870 patterns: few duplicates among 1024 draws
    assert bool((sampled.sum(1) == 8).all())
    with pytest.raises(PatternError):
        kn_patterns(4, 4)
    with pytest.raises(PatternError):
        kn_patterns(2, 17)


def test_cast_strong_prior_returns_the_prior_mask() -> None:
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(8, 16, generator=gen)
    stats = GroupCovariance(_random_cov(4, 4, gen), rows=10, n=4)
    prior = nm_mask(torch.randn(8, 16, generator=gen), 2, 4)  # a valid 2:4 mask unrelated to u
    strong = cast_project(u, stats, 2, 4, prior_mask=prior, config=CastConfig(prior_alpha=1e6))
    assert torch.equal(strong, prior)
    free = cast_project(u, stats, 2, 4)
    assert not torch.equal(free, prior)
    esm = cast_project(u, stats, 2, 4, prior_mask=prior, config=CastConfig(prior_alpha=1e6, prior_scale="esm"))
    assert torch.equal(esm, prior)
    with pytest.raises(MPPluginError, match="prior mask"):
        cast_project(u, stats, 2, 4, config=CastConfig(prior_alpha=1.0))


def test_cast_source_options() -> None:
    dense = torch.arange(1.0, 9.0).reshape(2, 4)
    ser_mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert torch.equal(cast_source(dense), dense)
    assert torch.equal(cast_source(dense, ser_mask, "ser", free_restoration=True), dense)
    zeroed = cast_source(dense, ser_mask, "ser", free_restoration=False)
    assert torch.equal(zeroed, dense * ser_mask)
    tuned = cast_source(dense, ser_mask, "ser", free_restoration=True, ser_weight=dense * 10)
    assert torch.equal(tuned, torch.where(ser_mask, dense * 10, dense))
    with pytest.raises(MPPluginError):
        cast_source(dense, None, "ser")


def test_cast_rejects_mismatched_group_size_and_width() -> None:
    stats = GroupCovariance(torch.eye(4, dtype=torch.float64).repeat(2, 1, 1), rows=1, n=4)
    with pytest.raises(PatternError, match="groups of 4"):
        cast_project(torch.randn(3, 8), stats, 4, 8)
    with pytest.raises(PatternError, match="divisible"):
        cast_project(torch.randn(3, 10), stats, 2, 4)


# ------------------------------------------------------------------ covariance layout checks


def _output_energy(delta_out: torch.Tensor, channel_dim: int) -> float:
    """Σ over output channels of the mean over positions of Δout²."""
    d = delta_out.movedim(channel_dim, -1).reshape(-1, delta_out.shape[channel_dim])
    return float(d.square().mean(0).sum())


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
        torch.nn.Conv2d(3, 4, (3, 2), dilation=(1, 2), padding="same", padding_mode="reflect", bias=False),
        torch.nn.Conv1d(4, 5, 3, padding=2, bias=False),
    ],
)
def test_group_covariance_layout_matches_conv_output_error(conv: torch.nn.Module) -> None:
    """k:n groups are the input channels at one kernel position: with n = C_in/groups and a
    weight change at a single kernel position, Σ rᵀCr equals the true mean squared output change."""
    x = torch.randn(3, conv.in_channels, *([9, 7] if isinstance(conv, torch.nn.Conv2d) else [11]))
    n = conv.weight.shape[1]
    stats = capture_covariances(torch.nn.Sequential(conv), {"0": n}, x, max_rows=10_000)["0"]
    assert stats.groups == conv.groups * conv.weight[0, 0].numel()
    g = torch.Generator().manual_seed(conv.weight[0, 0].numel())
    for _ in range(3):
        pos = int(torch.randint(conv.weight[0, 0].numel(), (1,), generator=g))
        delta = torch.zeros_like(conv.weight)
        delta.view(*delta.shape[:2], -1)[..., pos] = torch.randn(*delta.shape[:2], generator=g)
        _check_conv_error(conv, x, stats, delta)


def _check_conv_error(conv: torch.nn.Module, x: torch.Tensor, stats, delta: torch.Tensor) -> None:
    conv_delta = type(conv)(**_conv_kwargs(conv))
    with torch.no_grad():
        conv_delta.weight.copy_(delta)
    with torch.no_grad():
        expected = _output_energy(conv_delta(x), 1)
    got = float(calibration_loss(delta, stats, conv_groups=conv.groups))
    assert got == pytest.approx(expected, rel=1e-5)


def _conv_kwargs(conv: torch.nn.Module) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": False,
        "padding_mode": conv.padding_mode,
    }


def test_linear_tokens_are_flattened_and_rows_capped() -> None:
    lin = torch.nn.Linear(8, 3)
    x = torch.randn(4, 50, 8)  # B·T = 200 rows
    stats = capture_covariances(torch.nn.Sequential(lin), {"0": 8}, [x, x], max_rows=4096)["0"]
    assert stats.rows == 400
    expected = (x.reshape(-1, 8).double().T @ x.reshape(-1, 8).double()) / 200
    assert torch.allclose(stats.cov[0], expected)
    capped = capture_covariances(torch.nn.Sequential(lin), {"0": 4}, x, max_rows=64)["0"]
    assert capped.rows == 64 and capped.cov.shape == (2, 4, 4)


def test_capture_leaves_batchnorm_statistics_and_mode_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4)).train()
    before = model[1].running_mean.clone()
    stats = capture_covariances(model, {"0": 4, "2": 4}, torch.randn(32, 8) + 3.0)
    assert set(stats) == {"0", "2"} and model.training
    assert torch.equal(model[1].running_mean, before)


def test_capture_rejects_unknown_layers_and_bad_batches() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(MPPluginError, match="no module"):
        capture_covariances(model, {"7": 4}, torch.randn(2, 8))
    with pytest.raises(MPPluginError, match="tensor, numpy array, tuple"):
        capture_covariances(model, {"0": 4}, "text")
    with pytest.raises(PatternError, match="not divisible"):
        capture_covariances(model, {"0": 3}, torch.randn(2, 8))
    assert not model[0]._forward_hooks  # hooks removed even after errors


# ------------------------------------------------------------------ real model, real photo


def _photo_batch(count: int = 4, size: int = 64) -> torch.Tensor:
    matplotlib = pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    gen = torch.Generator().manual_seed(0)
    crops = []
    for _ in range(count):
        side = int(torch.randint(200, 400, (1,), generator=gen))
        top = int(torch.randint(0, img.shape[1] - side, (1,), generator=gen))
        left = int(torch.randint(0, img.shape[2] - side, (1,), generator=gen))
        crop = img[:, top : top + side, left : left + side][None]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.cat(crops) - mean) / std


@pytest.mark.parametrize("k,n", [(2, 4), (8, 16)])
def test_cast_loss_not_above_magnitude_on_efficientnet_lite0(efficientnet_lite0, k: int, n: int) -> None:
    from mp_plugin.layers.discovery import find_target_layers

    model = efficientnet_lite0
    targets = [t for t in find_target_layers(model)[0] if t.shape[1] % n == 0][:: 3 if n == 4 else 6]
    assert len(targets) >= 5
    stats = capture_covariances(model, {t.name: n for t in targets}, _photo_batch(), max_rows=2048)
    total_cast = total_mag = 0.0
    for t in targets:
        w = t.weight.detach()
        s = stats[t.name]
        cast_mask = cast_project(w, s, k, n)
        assert bool((kn_group_counts(cast_mask.reshape(w.shape[0], -1), n) == k).all())
        mag_mask = nm_mask(w, k, n)
        loss_cast = float(calibration_loss(w * ~cast_mask, s))
        loss_mag = float(calibration_loss(w * ~mag_mask, s))
        assert loss_cast <= loss_mag * (1 + 1e-9), t.name
        total_cast += loss_cast
        total_mag += loss_mag
    # on real activations the covariance matters: CAST is clearly better overall
    print(f"{k}:{n} CAST/magnitude calibration loss = {total_cast / total_mag:.3f}")
    assert total_cast < 0.97 * total_mag


def test_first_batch_of_calibration_data() -> None:
    from mp_plugin.layers.calibration import first_batch

    x, y = torch.randn(2, 4), torch.randn(3, 4)
    assert first_batch([x, y]) is x
    assert first_batch(x) is x
    batch = {"input_ids": torch.ones(1, 3)}
    assert first_batch(batch) is batch
    assert first_batch([]) is None


def test_covariance_capture_and_accuracy_give_back_every_train_flag():
    from mp_plugin.evaluation.classifier_training import accuracy
    from mp_plugin.layers.calibration import capture_covariances

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in training
    capture_covariances(model, {"0": 4, "2": 4}, torch.randn(32, 8))
    accuracy(model, torch.randn(10, 8), torch.randint(0, 4, (10,)))
    assert model.training and model[0].training and model[2].training and not model[1].training
