"""The ``mp-bulk`` budget (mp_plugin.budget.bulk_share): global magnitude weighted by the MP bulk share.

β = 0 is global magnitude to the weight; the total is exact at every β; a layer whose
energy lies in the MP bulk is pruned less than global magnitude prunes it and a
spike-dominated layer more; the setting survives save/load; bad settings are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mp_plugin.budget.bulk_share import BulkShareConfig, bulk_share_weights, bulk_share_z
from mp_plugin.budget.rules import BUDGET_METHODS
from mp_plugin.errors import ConfigError
from mp_plugin.masks.counts import prune_target
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan


class _TwoLayers(nn.Module):
    """``noise``: iid entries (bulk share ≈ 1); ``spiky``: a strong rank-2 part over noise of the same scale."""

    def __init__(self, d: int = 96) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.noise = nn.Linear(d, d, bias=False)
        self.spiky = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.noise.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
            low = torch.randn(d, 2, generator=g) @ torch.randn(2, d, generator=g)
            self.spiky.weight.copy_(torch.randn(d, d, generator=g) / d**0.5 + 0.8 * low / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spiky(torch.relu(self.noise(x)))


@pytest.fixture(scope="module")
def net() -> _TwoLayers:
    return _TwoLayers()


def test_registered_with_a_doc() -> None:
    assert "mp-bulk" in BUDGET_METHODS
    assert "bulk" in BUDGET_METHODS["mp-bulk"].doc and not BUDGET_METHODS["mp-bulk"].needs_calibration


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_exact_total_and_beta_zero_is_global_magnitude(net: _TwoLayers, s: float) -> None:
    mag = plan(net, s, "unstructured", "magnitude")
    zero = plan(net, s, "unstructured", "mp-bulk", PlanConfig(bulk_share=BulkShareConfig(beta=0.0)), reuse_fits=mag)
    assert [lp.n_prune for lp in zero.layers] == [lp.n_prune for lp in mag.layers]
    ours = plan(net, s, "unstructured", "mp-bulk", reuse_fits=mag)
    total = sum(lp.numel for lp in ours.layers)
    assert sum(lp.n_prune for lp in ours.layers) == prune_target(s, total)


def test_bulk_layer_pruned_less_spiky_layer_more(net: _TwoLayers) -> None:
    mag = plan(net, 0.5, "unstructured", "magnitude")
    by_name = {lp.name: lp for lp in mag.layers}
    assert by_name["spiky"].fit.spike_energy_fraction > 0.3 > by_name["noise"].fit.spike_energy_fraction
    ours = {lp.name: lp for lp in plan(net, 0.5, "unstructured", "mp-bulk", reuse_fits=mag).layers}
    assert ours["noise"].n_prune < by_name["noise"].n_prune
    assert ours["spiky"].n_prune > by_name["spiky"].n_prune
    assert ours["noise"].z > 0 > ours["spiky"].z
    stronger = {
        lp.name: lp
        for lp in plan(
            net, 0.5, "unstructured", "mp-bulk", PlanConfig(bulk_share=BulkShareConfig(beta=1.0)), reuse_fits=mag
        ).layers
    }
    assert stronger["noise"].n_prune < ours["noise"].n_prune  # a larger β moves more


def test_weights_follow_the_rule_and_missing_fits_are_neutral(net: _TwoLayers) -> None:
    fits = [lp.fit for lp in plan(net, 0.5, "unstructured", "magnitude").layers]
    w, z = bulk_share_weights(fits, 0.25)
    v = np.log([1.0 - f.spike_energy_fraction for f in fits])
    np.testing.assert_allclose(z, (v - v.mean()) / v.std())
    np.testing.assert_allclose(w, np.exp(-0.25 * z))
    z3 = bulk_share_z([fits[0], None, fits[1]])
    assert z3[1] == 0.0 and z3[0] > 0 > z3[2]
    assert bulk_share_z([fits[0], fits[0]]).tolist() == [0.0, 0.0]  # no spread → no change


def test_setting_survives_save_and_load(net: _TwoLayers, tmp_path) -> None:
    cfg = PlanConfig(bulk_share=BulkShareConfig(beta=0.6))
    p = plan(net, 0.5, "unstructured", "mp-bulk", cfg)
    back = PrunePlan.load(p.save(tmp_path / "plan.json"))
    assert back.config.bulk_share.beta == 0.6
    assert [lp.n_prune for lp in back.layers] == [lp.n_prune for lp in p.layers]


@pytest.mark.parametrize("beta", [-0.1, float("nan"), True, "0.2"])
def test_bad_beta_is_refused(beta: object) -> None:
    with pytest.raises(ConfigError, match="beta"):
        BulkShareConfig(beta=beta)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bulk_share"):
        PlanConfig(bulk_share={"beta": 0.2})  # type: ignore[arg-type]


def test_route_defaults(net: _TwoLayers) -> None:
    """One-shot routes default to mp-bulk; routes with prune–restore keep global magnitude (the measurement)."""
    from mp_plugin.budget.rules import DEFAULT_BUDGET, DEFAULT_RESTORE_BUDGET, default_budget
    from mp_plugin.restore import RestoreConfig

    assert (DEFAULT_BUDGET, DEFAULT_RESTORE_BUDGET) == ("mp-bulk", "magnitude")
    assert default_budget() == default_budget(False) == default_budget(None) == DEFAULT_BUDGET
    assert default_budget(True) == default_budget(RestoreConfig()) == default_budget({}) == DEFAULT_RESTORE_BUDGET
    assert plan(net, 0.5).method == DEFAULT_BUDGET
