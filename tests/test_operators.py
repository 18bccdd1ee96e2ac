"""The 2023/2025 spectral operators: rank removal, low-rank split, vector sparsification, BBP shrinkage."""

from __future__ import annotations

import math

import pytest
import torch

from mp_plugin import MPPluginError
from mp_plugin.spectrum import fit_marchenko_pastur
from mp_plugin.spectrum.operators import (
    SPECTRAL_OPERATORS,
    kept_rank,
    low_rank_split,
    remove_singular_values,
    replace_module,
    shrink_spikes,
    sparsify_singular_vectors,
)

SIGMA = 0.02


def _spiked(n_rows: int, n_cols: int, thetas: list[float], seed: int = 0) -> tuple[torch.Tensor, float]:
    """Noise of entry std SIGMA plus rank-len(thetas) signal with strengths θ·σ·√max(N, M)."""
    gen = torch.Generator().manual_seed(seed)
    scale = SIGMA * math.sqrt(max(n_rows, n_cols))
    u, _ = torch.linalg.qr(torch.randn(n_rows, len(thetas), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n_cols, len(thetas), generator=gen))
    w = SIGMA * torch.randn(n_rows, n_cols, generator=gen) + (u * torch.tensor(thetas) * scale) @ v.T
    return w, scale


def test_registry_names() -> None:
    assert set(SPECTRAL_OPERATORS) >= {"sv_removal", "sv_sparsify", "bbp_shrink"}


def test_remove_singular_values_keeps_spikes_plus_fraction() -> None:
    w, _ = _spiked(120, 80, [4.0, 3.0])
    fit = fit_marchenko_pastur(w)
    assert fit.n_spikes >= 2  # β = 0.8 puts σ₊ slightly below the edge: a bulk value may count
    out = remove_singular_values(w, fit, keep_fraction=0.25)
    r = fit.n_spikes + math.floor(0.25 * (80 - fit.n_spikes))
    assert kept_rank(fit, 0.25) == r
    assert int(torch.linalg.matrix_rank(out)) == r
    s_in, s_out = torch.linalg.svdvals(w), torch.linalg.svdvals(out)
    assert torch.allclose(s_out[:r], s_in[:r], rtol=1e-4)  # the largest r are kept as they were
    assert kept_rank(fit, 0.0, min_rank=10) == 10
    with pytest.raises(MPPluginError):
        kept_rank(fit, 1.5)


@pytest.mark.parametrize(
    "module",
    [
        torch.nn.Linear(96, 64),
        torch.nn.Conv2d(16, 24, 3, stride=2, padding=1),
        torch.nn.Conv1d(12, 20, 5, padding=2, bias=False),
    ],
)
def test_low_rank_split_equals_recomposed_weight_and_saves_parameters(module: torch.nn.Module) -> None:
    fit = fit_marchenko_pastur(module.weight.detach())
    split = low_rank_split(module, fit, keep_fraction=0.1, min_rank=2)
    assert isinstance(split, torch.nn.Sequential)
    r = kept_rank(fit, 0.1, 2)
    n_out, n_in = module.weight.shape[0], module.weight[0].numel()
    n_split = sum(p.numel() for p in split.parameters())
    bias = module.weight.shape[0] if module.bias is not None else 0
    assert n_split == r * (n_out + n_in) + bias < sum(p.numel() for p in module.parameters())
    reference = type(module)(**_same_geometry(module))
    with torch.no_grad():
        reference.weight.copy_(remove_singular_values(module.weight, fit, 0.1, min_rank=2))
        if module.bias is not None:
            reference.bias.copy_(module.bias)
    x = (
        torch.randn(2, 96)
        if isinstance(module, torch.nn.Linear)
        else torch.randn(2, module.in_channels, *([9, 9] if isinstance(module, torch.nn.Conv2d) else [13]))
    )
    with torch.no_grad():
        assert torch.allclose(split(x), reference(x), atol=1e-5)


def _same_geometry(module: torch.nn.Module) -> dict:
    if isinstance(module, torch.nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "bias": module.bias is not None,
    }


def test_low_rank_split_declines_when_it_would_not_save() -> None:
    lin = torch.nn.Linear(32, 32)
    fit = fit_marchenko_pastur(lin.weight.detach())
    assert low_rank_split(lin, fit, keep_fraction=1.0) is None
    with pytest.raises(MPPluginError, match="grouped"):
        conv = torch.nn.Conv2d(8, 8, 3, groups=2)
        low_rank_split(conv, fit_marchenko_pastur(conv.weight.detach()))


def test_replace_module_in_nested_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(64, 64)))
    fit = fit_marchenko_pastur(model[0].weight.detach())
    old = replace_module(model, "0", low_rank_split(model[0], fit, 0.1))
    assert isinstance(old, torch.nn.Linear) and isinstance(model[0], torch.nn.Sequential)
    replace_module(model, "2.0", torch.nn.Identity())
    assert isinstance(model[2][0], torch.nn.Identity)
    assert model(torch.randn(3, 96)).shape == (3, 64)
    with pytest.raises(MPPluginError):
        replace_module(model, "5", torch.nn.Identity())


def test_sparsify_singular_vectors_power_rule() -> None:
    w, _ = _spiked(128, 96, [5.0])
    fit = fit_marchenko_pastur(w)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    theta = 0.05
    out = sparsify_singular_vectors(w, fit, theta=theta)
    assert out.shape == w.shape
    # reproduce the rule by hand for one bulk component and the spike
    thr = theta * torch.clamp((1 - s / fit.sigma_plus).clamp_min(0) ** 30, min=1 / 750)
    expected = (torch.where(u.abs() < thr, 0.0, u) * s) @ torch.where(vh.abs() < thr[:, None], 0.0, vh)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    # the spike (s ≫ σ₊) is hardly touched, the smallest bulk components lose most entries
    assert float(thr[0]) == pytest.approx(theta / 750)
    assert float(thr[-1]) > 30 * float(thr[0])
    default = sparsify_singular_vectors(w, fit)  # θ from the 2025 schedule at t = 0.06
    assert not torch.equal(default, w)


def test_shrink_spikes_recovers_clean_strengths_and_moves_spikes_down() -> None:
    thetas = [4.0, 2.5, 1.6]
    w, scale = _spiked(400, 200, thetas, seed=1)
    fit = fit_marchenko_pastur(w)
    assert fit.n_spikes >= 3
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    shrunk = torch.diagonal(u.T @ shrink_spikes(w, fit).double() @ vh.T)  # per component, same vectors
    observed, est, truth = s[:3] / scale, shrunk[:3] / scale, torch.tensor(thetas, dtype=torch.float64)
    assert bool((est < observed).all())  # spikes move down
    assert float((est - truth).abs().max()) < 0.12  # to the clean signal strengths (finite-N error)
    assert float((observed - truth).abs().max()) > 0.3  # which the raw values miss
    assert torch.allclose(shrunk[fit.n_spikes :], s[fit.n_spikes :])  # bulk values untouched


def test_shrink_square_case_matches_closed_form() -> None:
    w, _ = _spiked(150, 150, [3.0], seed=2)
    fit = fit_marchenko_pastur(w)
    s = torch.linalg.svdvals(w.double())
    g = fit.sigma**2 * 150
    expected = 0.5 * (s[0] + torch.sqrt(s[0] ** 2 - 4 * g))
    assert float(torch.linalg.svdvals(shrink_spikes(w, fit).double())[0]) == pytest.approx(float(expected), rel=1e-5)
