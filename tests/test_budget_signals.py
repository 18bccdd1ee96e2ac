"""Opt-in SEB signals (mp_plugin.budget.signals): registered, exact totals, and shape-free where σ₊ is not."""

from __future__ import annotations

import torch
from torch import nn

import mp_plugin.budget.signals  # noqa: F401  (registers the methods)
from mp_plugin.budget.rules import BUDGET_METHODS
from mp_plugin.masks.counts import prune_target
from mp_plugin.planning.build import plan


def _noise_model(seed: int = 0) -> nn.Sequential:
    """Three pure-noise Linear layers with the SAME entry scale but different shapes."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 64)]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(0.05 * torch.randn(lin.weight.shape, generator=g))
    return nn.Sequential(*layers)


def test_signal_methods_are_registered_and_hit_the_total_exactly() -> None:
    model = _noise_model()
    total = sum(m.weight.numel() for m in model)
    for name in ("seb-sigma", "seb-bulk-energy", "seb-bulk-fraction"):
        assert name in BUDGET_METHODS
        p = plan(model, 0.6, "unstructured", name)
        assert sum(lp.n_prune for lp in p.layers) == prune_target(0.6, total)


def test_sigma_signal_is_shape_free_while_sigma_plus_encodes_shape() -> None:
    model = _noise_model()
    fits = [lp.fit for lp in plan(model, 0.5, "unstructured", "seb").layers]
    edge = [f.sigma_plus for f in fits]
    sig = [f.sigma for f in fits]
    # same entry scale 0.05 everywhere: σ̂ agrees within 5 %, σ₊ ∝ √N+√M differs by > 40 %
    assert (max(sig) - min(sig)) / min(sig) < 0.05
    assert all(abs(v - 0.05) < 0.0025 for v in sig)
    assert (max(edge) - min(edge)) / min(edge) > 0.4
