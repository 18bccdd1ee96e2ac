"""Bounded budgets (mp_plugin.budget.bounded) and the dense/2:4 mix (mp_plugin.budget.mix).

Every method: exact total to one weight, every layer inside its band, equal
sparsity inside a block where the rule averages per block; the mix: only dense
and 2:4, the count of 2:4 layers that brings the removed total closest to the
target, and the ranking each rule states.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mp_plugin.budget.bounded import (
    BoundedConfig,
    block_mean,
    bounded_ratios,
    layer_blocks,
    ratios_to_counts,
)
from mp_plugin.budget.bulk_share import BulkShareConfig, bulk_share_weights
from mp_plugin.budget.calibrated import noise_floor_counts
from mp_plugin.budget.mix import (
    MixLayers,
    choose_kn_layers,
    kn_removed_energy,
    knapsack_kn_layers,
    layer_damage,
)
from mp_plugin.budget.rules import BUDGET_METHODS, BudgetContext
from mp_plugin.errors import ConfigError
from mp_plugin.masks.counts import prune_target
from mp_plugin.masks.select import check_nm, nm_mask
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan
from mp_plugin.pruning.apply_plan import apply

BOUNDED = ("alpha", "bounded-bulk-energy", "bounded-spikes", "bounded-edge", "owl")


class _Block(nn.Module):
    def __init__(self, d: int, rank: int, g: torch.Generator) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        with torch.no_grad():  # low-rank structure of a block-specific rank on top of noise
            for lin in (self.q, self.up, self.down):
                o, i = lin.weight.shape
                lr = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) / rank**0.5
                lin.weight.copy_(0.05 * torch.randn(o, i, generator=g) + 0.08 * lr / i**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(torch.relu(self.q(x)))))


class _Net(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList([_Block(d, r, g) for r in (1, 4, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layers:
            x = blk(x)
        return x


@pytest.fixture(scope="module")
def net() -> _Net:
    torch.manual_seed(0)
    return _Net()


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    return [torch.randn(256, 32, generator=torch.Generator().manual_seed(1))]


def _band(s: float, eps: float, cap: float = 0.95) -> tuple[float, float]:
    return max(0.0, s - eps), min(s + eps, max(s, cap))


@pytest.mark.parametrize("method", (*BOUNDED, "noise-floor"))
@pytest.mark.parametrize("s", (0.5, 0.7))
def test_bounded_methods_exact_total_and_inside_the_band(net: _Net, calib: list, method: str, s: float) -> None:
    cfg = PlanConfig()
    p = plan(net, s, "unstructured", method, cfg, calibration=calib)
    total = sum(lp.numel for lp in p.layers)
    assert sum(lp.n_prune for lp in p.layers) == prune_target(s, total)
    eps = {"owl": cfg.bounded.owl_lambda, "noise-floor": cfg.bounded.noise_epsilon}.get(method, cfg.bounded.epsilon)
    lo, hi = _band(s, eps)
    for lp in p.layers:
        assert lo * lp.numel - 1 <= lp.n_prune <= hi * lp.numel + 1, (lp.name, lp.unstructured_budget)
    budgets = [lp.unstructured_budget for lp in p.layers]
    assert max(budgets) - min(budgets) > 0.01  # the signal does reallocate on this model


@pytest.mark.parametrize("method", ("mag-alpha", "mag-bulk-energy", "mag-spikes", "mag-edge", "mag-noise-floor"))
def test_magnitude_anchored_methods_stay_near_global_magnitude(net: _Net, calib: list, method: str) -> None:
    cfg = PlanConfig()
    s = 0.6
    glob = plan(net, s, "unstructured", "magnitude")
    p = plan(net, s, "unstructured", method, cfg, calibration=calib)
    assert sum(lp.n_prune for lp in p.layers) == sum(lp.n_prune for lp in glob.layers)
    eps = cfg.bounded.anchor_epsilon
    moved = 0
    for lp, g in zip(p.layers, glob.layers):
        assert abs(lp.n_prune - g.n_prune) <= eps * lp.numel + 1, lp.name
        moved += lp.n_prune != g.n_prune
    assert moved >= 2


@pytest.mark.parametrize("method", BOUNDED)
def test_bounded_methods_average_per_block(net: _Net, calib: list, method: str) -> None:
    p = plan(net, 0.6, "unstructured", method, calibration=calib)
    blocks = layer_blocks([lp.name for lp in p.layers])
    assert blocks[:3] == ["layers.0"] * 3 and len(set(blocks)) == 3
    for key in set(blocks):
        ratios = [lp.unstructured_budget for lp, b in zip(p.layers, blocks) if b == key]
        sizes = [lp.numel for lp, b in zip(p.layers, blocks) if b == key]
        assert max(ratios) - min(ratios) <= 1.0 / min(sizes) + 1e-12
    off = plan(
        net, 0.6, "unstructured", method, PlanConfig(bounded=BoundedConfig(block_average=False)), calibration=calib
    )
    assert len({round(lp.unstructured_budget, 6) for lp in off.layers}) > 3


def test_bounded_ratios_mean_is_exact_and_direction_follows_the_signal() -> None:
    u = np.array([-1.0, -0.2, 0.4, 1.0])
    n = np.array([100, 4000, 300, 50000])
    for s in (0.3, 0.5, 0.85):
        r = bounded_ratios(u, n, s, 0.2)
        assert abs(float((r * n).sum() / n.sum()) - s) < 1e-12
        lo, hi = _band(s, 0.2)
        assert r.min() >= lo - 1e-15 and r.max() <= hi + 1e-15
        assert np.all(np.diff(r) >= 0)  # higher u → at least as sparse
    assert np.allclose(bounded_ratios(u, n, 0.5, 0.0), 0.5)


def test_ratios_to_counts_hits_any_target_to_the_weight() -> None:
    n = [7, 13, 1000, 3]
    r = np.array([0.31, 0.77, 0.52, 0.0])
    target = int(round(float((r * np.array(n)).sum())))
    c = ratios_to_counts(r, n, target)
    assert sum(c) == target and all(0 <= ci <= ni for ci, ni in zip(c, n))
    assert all(abs(ci - ri * ni) < 1 for ci, ri, ni in zip(c, r, n))


def test_block_mean_is_weighted_and_skips_nan() -> None:
    v = block_mean(np.array([1.0, 3.0, np.nan, 5.0]), ["a", "a", "b", "b"], np.array([1.0, 3.0, 1.0, 1.0]))
    assert np.allclose(v, [2.5, 2.5, 5.0, 5.0])


def test_noise_floor_gives_the_steeper_layer_less_and_hits_the_total() -> None:
    grid = (0.25, 0.5, 0.75, 0.95)
    curves = {"a": np.array([0.01, 0.02, 0.04, 0.08]), "b": np.array([0.1, 0.2, 0.4, 0.8])}
    ctx = BudgetContext(["a", "b"], [], [1000, 3000], ["mlp", "mlp"], [None, None], 0.5)
    counts, rel, _ = noise_floor_counts(curves, np.array([0.05, 0.05]), ctx, grid, None, 0.95)
    assert sum(counts) == 2000
    assert counts[0] / 1000 > counts[1] / 3000  # "b" reaches the common multiple of its noise earlier
    # a larger noise share lets a layer go further at the same error curve
    counts2, _, _ = noise_floor_counts(
        {"a": curves["b"], "b": curves["b"]}, np.array([0.2, 0.05]), ctx, grid, None, 0.95
    )
    assert counts2[0] / 1000 > counts2[1] / 3000


def test_calibration_methods_refuse_without_data(net: _Net) -> None:
    for method in ("owl", "noise-floor"):
        assert BUDGET_METHODS[method].needs_calibration
        with pytest.raises(ConfigError, match="calibration"):
            plan(net, 0.5, "unstructured", method)


def test_noise_floor_reuses_precomputed_curves(net: _Net, calib: list) -> None:
    from mp_plugin.budget.calibrated import noise_floor_curves

    cfg = BoundedConfig()
    names = [lp.name for lp in plan(net, 0.5, "unstructured", "magnitude").layers]
    curves = noise_floor_curves(net, names, calib, cfg.noise_grid)
    assert all(np.all(np.diff(c) > -1e-9) or c[-1] > c[0] for c in curves.values())
    a = plan(net, 0.6, "unstructured", "noise-floor", calibration=calib)
    b = plan(
        net,
        0.6,
        "unstructured",
        "noise-floor",
        PlanConfig(bounded=BoundedConfig(noise_curves=curves)),
        calibration=calib,
    )
    assert [lp.n_prune for lp in a.layers] == [lp.n_prune for lp in b.layers]


# --------------------------------------------------------------------------- the dense/2:4 mix


def test_choose_kn_layers_takes_the_count_closest_to_the_target() -> None:
    costs = np.array([100.0, 200.0, 300.0, 400.0])
    keys = np.array([3.0, 0.0, 1.0, 2.0])  # visit order 1, 2, 3, 0
    chosen = choose_kn_layers(keys, costs, [True] * 4, 0.25)  # target 250 removed = 500 cost in 2:4
    assert chosen.tolist() == [False, True, True, False]
    # an ineligible layer is skipped, the next in rank order is taken instead
    chosen = choose_kn_layers(keys, costs, [True, False, True, True], 0.25)
    assert not chosen[1] and chosen.sum() >= 1
    assert not choose_kn_layers(keys, costs, [True] * 4, 0.0).any()


@pytest.mark.parametrize("rule", ("mp-bulk", "mp", "bulk-energy", "size", "budget"))
def test_auto_mix_only_dense_and_24_near_the_target(net: _Net, rule: str) -> None:
    cfg = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule=rule)
    for s in (0.25, 0.35, 0.45):
        p = plan(net, s, "auto", "magnitude", cfg)
        pats = {lp.pattern for lp in p.layers}
        assert pats <= {"dense", "2:4"} and "2:4" in pats
        smallest = min(lp.numel for lp in p.layers)
        assert abs(p.planned_sparsity * p.total_weights - s * p.total_weights) <= smallest / 4 + 1
        for lp in p.layers:
            assert lp.n_prune == (lp.numel // 2 if lp.pattern == "2:4" else 0)


def test_mix_size_rule_takes_the_largest_and_scores_rule_follows_scores(net: _Net) -> None:
    p = plan(net, 0.25, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="size"))
    big = max(lp.numel for lp in p.layers)
    chosen = [lp for lp in p.layers if lp.pattern == "2:4"]
    assert chosen and all(lp.numel == big for lp in chosen)  # 4 of the 6 largest layers reach 25 %
    names = [lp.name for lp in p.layers]
    scores = {n: float(i) for i, n in enumerate(reversed(names))}  # last layer first
    q = plan(
        net, 0.1, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="scores", mix_scores=scores)
    )
    assert q.layers[-1].pattern == "2:4" and q.layers[0].pattern == "dense"
    # equal-cost target with given per-layer costs (e.g. MACs): a cheap layer counts for little
    costs = {n: (1.0 if i == len(names) - 1 else 100.0) for i, n in enumerate(names)}
    r = plan(
        net,
        0.1,
        "auto",
        "magnitude",
        PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="scores", mix_scores=scores, mix_costs=costs),
    )
    # the damage rules solve the knapsack exactly: by weights, q + down of the last block remove exactly
    # 10 %; by cost, two cost-100 layers come closest, and the two least damaging are taken
    assert [lp.pattern for lp in q.layers][-3:] == ["2:4", "dense", "2:4"]
    assert [lp.pattern for lp in r.layers][-3:] == ["2:4", "2:4", "dense"]


def test_knapsack_takes_the_least_damage_where_the_greedy_overshoots() -> None:
    costs = np.array([500.0, 300.0, 300.0])
    damage = np.array([5.0, 2.7, 2.7])  # per cost 0.010, 0.009, 0.009: the greedy takes 1 and 2 (removes 300)
    s = 250 / costs.sum()
    greedy = choose_kn_layers(damage / costs, costs, [True] * 3, s)
    exact = knapsack_kn_layers(damage, costs, [True] * 3, s)
    assert greedy.tolist() == [False, True, True]
    assert exact.tolist() == [True, False, False]  # removes exactly 250 with damage 5 < 5.4
    # an ineligible layer is never taken; the closest reachable total is used when none is within tolerance
    assert knapsack_kn_layers(damage, costs, [False, True, True], s).tolist() == [False, True, True]  # 300 is closest
    # unknown damage (NaN) goes only where the target cannot be reached without it
    d = np.array([np.nan, 1.0, 1.0, 1.0])
    c = np.array([200.0, 200.0, 200.0, 200.0])
    quarter = knapsack_kn_layers(d, c, [True] * 4, 0.25)
    assert not quarter[0] and quarter.sum() == 2
    assert knapsack_kn_layers(d, c, [True] * 4, 0.5).all()
    assert not knapsack_kn_layers(d, c, [True] * 4, 0.0).any()
    # equally far below and above the target (at 25 % a set and its complement are): the larger total
    tie = knapsack_kn_layers(np.array([1.0, 9.0]), np.array([10.0, 90.0]), [True, True], 0.25)
    assert tie.tolist() == [False, True]
    with pytest.raises(ConfigError):
        knapsack_kn_layers(np.array([1.0, 1.0]), np.array([-1.0, 1.0]), [True, True], 0.25)
    # a measured damage may be slightly negative (float noise of an unchanged output): still solved
    assert knapsack_kn_layers(np.array([-1e-9, 1.0]), np.array([100.0, 100.0]), [True, True], 0.25).tolist() == [
        True,
        False,
    ]


def test_a_registered_damage_rule_is_a_mix_rule(net: _Net) -> None:
    from mp_plugin.budget.mix import DAMAGE_FUNCTIONS, mix_rules, register_mix_damage

    def last_layer_cheapest(layers):  # noqa: ANN001, ANN202
        return np.asarray([0.0 if i == len(layers.names) - 1 else 1.0 for i in range(len(layers.names))])

    register_mix_damage("test-last-first", last_layer_cheapest)
    try:
        assert "test-last-first" in mix_rules()
        p = plan(net, 0.05, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="test-last-first"))
        assert [lp.pattern == "2:4" for lp in p.layers] == [False] * (len(p.layers) - 1) + [True]
    finally:
        DAMAGE_FUNCTIONS.pop("test-last-first")
    with pytest.raises(ConfigError, match="rank rule"):
        register_mix_damage("size", last_layer_cheapest)
    with pytest.raises(ConfigError, match="mix_rule must be one of"):
        PlanConfig(mix_rule="test-last-first")
    with pytest.raises(ConfigError, match="at least one pattern"):
        PlanConfig(auto_patterns=())


def test_mp_bulk_mix_damage_is_removed_energy_in_budget_units(net: _Net) -> None:
    base = plan(net, 0.5, "unstructured", "magnitude")
    mods = dict(net.named_modules())
    weights = [mods[lp.name].weight for lp in base.layers]
    fits = [lp.fit for lp in base.layers]
    d = layer_damage("mp-bulk", MixLayers(weights, fits, [lp.name for lp in base.layers], beta=0.25))
    w, _ = bulk_share_weights(fits, 0.25)
    for x, dx, wx in zip(weights, d, w):
        keep = x.detach().abs().reshape(-1, 4).argsort(-1)[:, 2:]  # the two largest of each group of 4
        kept = x.detach().reshape(-1, 4).gather(-1, keep).square().sum()
        assert dx == pytest.approx((x.detach().square().sum() - kept).item() / wx**2, rel=1e-5)
        assert kn_removed_energy(x) == pytest.approx((x.detach().square().sum() - kept).item(), rel=1e-5)
    # the default mix rule is mp-bulk, and β follows PlanConfig.bulk_share
    p = plan(net, 0.25, "auto", "mp-bulk", PlanConfig(auto_patterns=("dense", "2:4")))
    assert p.config.mix_rule == "mp-bulk" and {lp.pattern for lp in p.layers} <= {"dense", "2:4"}
    assert p.config.bulk_share.mix_beta == p.config.bulk_share.beta == 0.25
    back = PrunePlan.from_dict(p.to_dict())
    assert back.config.bulk_share == p.config.bulk_share
    assert BulkShareConfig.from_dict({"beta": 0.5}).mix_beta == 0.25  # plans saved before mix_beta still load
    with pytest.raises(ConfigError, match="mix_beta"):
        BulkShareConfig(mix_beta=-1.0)
    # mix_beta = 0: the damage is the plain 2:4-removed energy; the plan follows it
    flat = plan(
        net,
        0.25,
        "auto",
        "magnitude",
        PlanConfig(auto_patterns=("dense", "2:4"), bulk_share=BulkShareConfig(mix_beta=0.0)),
    )
    energy = layer_damage("mp-bulk", MixLayers(weights, fits, [lp.name for lp in base.layers], beta=0.0))
    chosen = knapsack_kn_layers(energy, [lp.numel for lp in base.layers], [True] * len(energy), 0.25)
    assert [lp.pattern == "2:4" for lp in flat.layers] == chosen.tolist()


def test_mix_applies_exact_24_and_round_trips(net: _Net) -> None:
    import copy

    m = copy.deepcopy(net)
    p = plan(m, 0.35, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4")))
    back = PrunePlan.from_dict(p.to_dict())
    assert [lp.pattern for lp in back.layers] == [lp.pattern for lp in p.layers]
    assert back.config.mix_rule == "mp-bulk" and back.config.bounded == p.config.bounded
    apply(m, p)
    mods = dict(m.named_modules())
    for lp in p.layers:
        w = mods[lp.name].weight
        if lp.pattern == "2:4":
            assert check_nm(w, 2, 4) and int((w == 0).sum()) == lp.numel // 2
        else:
            assert int((w == 0).sum()) == 0
    # s ≥ 0.5 or mix_rule="round" keeps the old rounding
    q = plan(net, 0.35, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="round"))
    assert all(
        lp.n_prune == lpq.n_prune for lp, lpq in zip(plan(net, 0.35, "unstructured", "magnitude").layers, q.layers)
    )


def test_damage_rules_rank_by_damage_per_cost() -> None:
    from mp_plugin.budget.mix import mix_order

    weights = [torch.zeros(8, 8), torch.zeros(32, 8), torch.zeros(4, 8)]
    names = ["a", "b", "c"]
    keys = mix_order("scores", MixLayers(weights, [None] * 3, names, scores={"a": 1.0, "b": 1.0, "c": 0.6}))
    assert np.argsort(keys).tolist() == [
        1,
        0,
        2,
    ]  # equal damage: the larger layer first; c's damage per weight is highest
    keys = mix_order(
        "scores", MixLayers(weights, [None] * 3, names, scores={"a": 1.0, "b": 1.0, "c": 0.6}), costs=[1, 1, 1]
    )
    assert np.argsort(keys, kind="stable").tolist() == [2, 0, 1]


def test_size_rule_reads_layer_sizes_without_loading_weights() -> None:
    from mp_plugin.budget.mix import choose_mix, layer_sizes

    class _Unloadable(list):  # like LayerWeights of an offloaded model: sizes known, reading a weight is costly
        def numels(self) -> list[int]:
            return [100, 400, 200]

        def __getitem__(self, i):  # noqa: ANN001, ANN204
            raise AssertionError("the size rule loaded a weight")

        def __iter__(self):  # noqa: ANN204
            raise AssertionError("the size rule loaded a weight")

    weights = _Unloadable([None, None, None])
    assert layer_sizes(weights).tolist() == [100.0, 400.0, 200.0]
    chosen = choose_mix("size", MixLayers(weights, [None] * 3, ["a", "b", "c"]), [True] * 3, 200 / 700)
    assert chosen.tolist() == [False, True, False]  # the largest layer alone removes 200 of 700
    assert layer_sizes([torch.zeros(3, 4), torch.zeros(2, 2)]).tolist() == [12.0, 4.0]


def test_measured_mix_damage_is_the_relative_output_error_and_leaves_the_model(net: _Net, calib: list) -> None:
    import copy

    from mp_plugin.budget.mix_measured import measured_kn_damage

    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    before = copy.deepcopy(net.state_dict())
    net.train()
    d = measured_kn_damage(net, names, calib)
    assert net.training  # the flag is put back
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # and every weight
    assert set(d) == set(names) and all(v > 0 for v in d.values())
    # one layer by hand: only layers.1.up at magnitude 2:4
    x = calib[0]
    twin = copy.deepcopy(net).eval()
    w = twin.layers[1].up.weight
    with torch.no_grad():
        y = twin(x).double()
        w.mul_(nm_mask(w, 2, 4).to(w.dtype))
        y1 = twin(x).double()
    assert d["layers.1.up"] == pytest.approx(float((y1 - y).square().sum() / y.square().sum()), rel=1e-9)
    # a layer already 2:4 loses nothing more
    with torch.no_grad():
        w0 = twin.layers[0].q.weight
        w0.mul_(nm_mask(w0, 2, 4).to(w0.dtype))
    assert measured_kn_damage(twin, ["layers.0.q"], calib)["layers.0.q"] == 0.0


def test_measured_mix_rule_plans_with_calibration_and_refuses_without(net: _Net, calib: list) -> None:
    from mp_plugin.budget.mix_measured import measured_kn_damage

    cfg = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="measured")
    with pytest.raises(ConfigError, match="needs calibration data"):
        plan(net, 0.3, "auto", "magnitude", cfg)
    p = plan(net, 0.3, "auto", "magnitude", cfg, calibration=calib)
    assert {lp.pattern for lp in p.layers} == {"dense", "2:4"}
    # the same choice as handing the measured damages to the 'scores' rule
    scores = measured_kn_damage(net, [lp.name for lp in p.layers], calib)
    q = plan(
        net, 0.3, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="scores", mix_scores=scores)
    )
    assert [lp.pattern for lp in p.layers] == [lp.pattern for lp in q.layers]
    # and the least damaging layer by measurement is among the 2:4 ones
    assert dict((lp.name, lp.pattern) for lp in p.layers)[min(scores, key=scores.get)] == "2:4"
    # outside the mix (s ≥ 50 % or other candidates) no calibration is needed
    assert plan(net, 0.6, "auto", "magnitude", cfg).layers


def test_model_output_finds_the_tensor() -> None:
    from mp_plugin.budget.mix_measured import model_output
    from mp_plugin.errors import CalibrationError

    t = torch.ones(2, 3)
    assert model_output(t) is t
    assert model_output((t, torch.zeros(1))) is t
    assert model_output({"logits": t, "other": torch.zeros(1)}) is t
    assert model_output({"hidden": t}) is t

    class _Out:
        last_hidden_state = t

    assert model_output(_Out()) is t
    with pytest.raises(CalibrationError, match="no tensor"):
        model_output("text")


def test_measured_mix_damage_counts_only_real_tokens() -> None:
    from mp_plugin.budget.mix_measured import measured_kn_damage

    class _Tok(nn.Module):  # per-token output; a padded token's output is different and must not count
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 8)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.lin(self.emb(input_ids))
            return h + 1e6 * (attention_mask == 0).unsqueeze(-1) * h

    torch.manual_seed(0)
    m = _Tok()
    ids = torch.randint(0, 10, (2, 5))
    full = {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    real = [  # the same real tokens, unpadded, as two batches
        {"input_ids": ids[:1, :3], "attention_mask": torch.ones(1, 3, dtype=torch.long)},
        {"input_ids": ids[1:], "attention_mask": torch.ones(1, 5, dtype=torch.long)},
    ]
    d_padded = measured_kn_damage(m, ["lin"], padded)["lin"]
    assert d_padded == pytest.approx(measured_kn_damage(m, ["lin"], real)["lin"], rel=1e-9)
    assert d_padded != pytest.approx(measured_kn_damage(m, ["lin"], full)["lin"], rel=1e-3)


def test_measured_restore_damage_measures_after_restoring_that_layer(net: _Net, calib: list) -> None:
    import copy

    from mp_plugin.budget.mix_measured import measured_kn_damage
    from mp_plugin.restore import RestoreConfig, capture_grams, restore_layer

    names = ["layers.0.q", "layers.2.down"]
    before = copy.deepcopy(net.state_dict())
    plain = measured_kn_damage(net, names, calib)
    restored = measured_kn_damage(net, names, calib, restore=RestoreConfig())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # the last layer writes the output (plus the residual): restoring it must lower the output error
    assert 0 < restored["layers.2.down"] < plain["layers.2.down"]
    # by hand for that layer
    twin = copy.deepcopy(net).eval()
    w = twin.layers[2].down.weight
    dense = w.detach().clone()
    with torch.no_grad():
        y = twin(calib[0]).double()
        w.mul_(nm_mask(w, 2, 4).to(w.dtype))
        restore_layer(w, dense, capture_grams(twin, ["layers.2.down"], calib)["layers.2.down"], RestoreConfig())
        y1 = twin(calib[0]).double()
    assert restored["layers.2.down"] == pytest.approx(float((y1 - y).square().sum() / y.square().sum()), rel=1e-6)
    # as a mix rule, with calibration
    cfg = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="measured-restore")
    with pytest.raises(ConfigError, match="needs calibration data"):
        plan(net, 0.3, "auto", "magnitude", cfg)
    p = plan(net, 0.3, "auto", "magnitude", cfg, calibration=calib)
    assert {lp.pattern for lp in p.layers} == {"dense", "2:4"}


def test_default_mix_rule_is_measured_with_calibration_and_mp_bulk_without(net: _Net, calib: list) -> None:
    from mp_plugin.budget.mix import default_mix_rule

    assert default_mix_rule(None) == "mp-bulk" and default_mix_rule(calib) == "measured"
    cfg = PlanConfig(auto_patterns=("dense", "2:4"))
    assert cfg.mix_rule is None  # resolved by plan, which records the rule it used
    free = plan(net, 0.3, "auto", "magnitude", cfg)
    data = plan(net, 0.3, "auto", "magnitude", cfg, calibration=calib)
    assert cfg.mix_rule is None  # the caller's config is not changed
    assert free.config.mix_rule == "mp-bulk" and data.config.mix_rule == "measured"
    explicit = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="measured")
    assert [lp.pattern for lp in data.layers] == [
        lp.pattern for lp in plan(net, 0.3, "auto", "magnitude", explicit, calibration=calib).layers
    ]
    # an explicit rule wins over the default, with or without data
    sized = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="size")
    assert plan(net, 0.3, "auto", "magnitude", sized, calibration=calib).config.mix_rule == "size"
    # and the recorded rule survives save/load
    assert PrunePlan.from_dict(data.to_dict()).config.mix_rule == "measured"


def test_measured_damage_without_the_dense_cache_is_the_same(net: _Net, calib: list) -> None:
    from mp_plugin.budget.mix_measured import measured_kn_damage

    names = ["layers.0.up", "layers.2.q"]
    cached = measured_kn_damage(net, names, [calib[0][:128], calib[0][128:]])
    recomputed = measured_kn_damage(net, names, [calib[0][:128], calib[0][128:]], max_cache_bytes=0)
    assert cached.keys() == recomputed.keys()
    for name in names:
        assert recomputed[name] == pytest.approx(cached[name], rel=1e-6)


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 2, stride=2, groups=2)
        self.c1 = nn.Conv1d(8, 8, 1)
        self.spare = nn.Linear(8, 8)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.relu(self.c2(x)))  # (B, 8, 4, 4)
        return self.c1(h.flatten(2))  # (B, 8, 16)


@pytest.mark.parametrize("offload", [False, True])
def test_measured_damage_of_convolutions_equals_pruning_by_hand(offload: bool) -> None:
    """Conv1d/2d (reflect padding, groups, stride): in memory (weight swapped) and offloaded (hook) alike."""
    import copy

    from mp_plugin.budget.mix_measured import measured_kn_damage

    torch.manual_seed(0)
    net = _Convs()
    ref = copy.deepcopy(net)
    x = torch.randn(6, 4, 8, 8)
    names = ["c2", "dw", "c1"]
    if offload:
        pytest.importorskip("accelerate")
        from accelerate import cpu_offload

        cpu_offload(net, execution_device="cpu")
        assert net.c2.weight.is_meta
    d = measured_kn_damage(net, names, [x])
    assert set(d) == set(names)
    for name in names:
        twin = copy.deepcopy(ref).eval()
        w = getattr(twin, name).weight
        with torch.no_grad():
            y = twin(x).double()
            w.mul_(nm_mask(w, 2, 4).to(w.dtype))
            y1 = twin(x).double()
        # offloaded, the hook subtracts f(x; W − P(W)) instead: equal up to float32 rounding
        rel = 1e-5 if offload else 1e-6
        assert d[name] == pytest.approx(float((y1 - y).square().sum() / y.square().sum()), rel=rel), name
    # a layer that never runs on the calibration data has an unknown damage, not a zero one
    assert np.isnan(measured_kn_damage(net, ["spare"], [x])["spare"])
    if offload:
        assert net.c2.weight.is_meta  # nothing was left in memory


def test_measured_damage_sees_a_weight_used_outside_its_module() -> None:
    import copy

    from fold_nets import FunctionalUse

    from mp_plugin.budget.mix_measured import measured_kn_damage

    torch.manual_seed(0)
    net = FunctionalUse()
    x = torch.randn(8, 16)
    d = measured_kn_damage(net, ["b"], [x])["b"]
    twin = copy.deepcopy(net)
    with torch.no_grad():
        y = twin(x).double()
        twin.b.weight.mul_(nm_mask(twin.b.weight, 2, 4).to(twin.b.weight.dtype))
        y1 = twin(x).double()
    assert d == pytest.approx(float((y1 - y).square().sum() / y.square().sum()), rel=1e-6)


def test_knapsack_refines_its_steps_with_the_layer_count_and_falls_back_for_thousands() -> None:
    """Many small layers: the rounding stays within the tolerance; beyond the table limit, damage per cost."""
    rng = np.random.default_rng(0)
    for n_layers in (600, 1000, 3000):  # 600: table of 60 000 steps (4096 would round each layer 3.4 → 3, +14 %)
        c = np.full(n_layers, 1000.0)
        d = rng.random(n_layers)
        chosen = knapsack_kn_layers(d, c, [True] * n_layers, 0.3)
        assert abs(0.5 * c[chosen].sum() / c.sum() - 0.3) <= 0.01
    many = 6000  # 6000 layers × 600 000 steps would exceed the 50 M-cell table: ordered by d/c instead
    c = np.concatenate([np.full(many - 2, 1000.0), [4e5, 4e5]])
    d = np.concatenate([rng.random(many - 2), [np.nan, 1e-9]])
    chosen = knapsack_kn_layers(d, c, [True] * many, 0.3)
    assert abs(0.5 * c[chosen].sum() / c.sum() - 0.3) <= 0.01
    assert chosen[-1] and not chosen[-2]  # the cheapest damage per weight first, the unknown one last
    order = np.argsort(d[:-2] / c[:-2])
    assert chosen[:-2][order[:100]].all() and not chosen[:-2][order[-100:]].any()


def test_mix_costs_and_scores_are_checked(net: _Net) -> None:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    for bad in ({"x": float("nan")}, {"x": -1.0}, {"x": True}, ["x"]):
        with pytest.raises(ConfigError, match="mix_costs"):
            PlanConfig(mix_costs=bad)
    with pytest.raises(ConfigError, match="mix_scores"):
        PlanConfig(mix_scores={"x": float("inf")})
    PlanConfig(mix_scores={"x": float("nan")}, mix_costs={"x": np.float32(2.0)})  # NaN score: unknown
    mix = {"auto_patterns": ("dense", "2:4")}
    with pytest.raises(ConfigError, match="not target layers of this model"):
        plan(net, 0.3, "auto", "magnitude", PlanConfig(**mix, mix_costs={**{n: 1.0 for n in names}, "typo": 1.0}))
    with pytest.raises(ConfigError, match="no cost for 1 target layer"):
        plan(net, 0.3, "auto", "magnitude", PlanConfig(**mix, mix_costs={n: 1.0 for n in names[1:]}))
    with pytest.raises(ConfigError, match="not target layers"):
        plan(net, 0.3, "auto", "magnitude", PlanConfig(**mix, mix_rule="scores", mix_scores={"typo": 1.0}))


def test_mix_rule_is_recorded_only_when_the_mix_is_chosen_and_a_far_target_warns(net: _Net, calib: list) -> None:
    cfg = PlanConfig(auto_patterns=("dense", "2:4"))
    assert plan(net, 0.6, "auto", "magnitude", cfg, calibration=calib).config.mix_rule is None  # rounding
    assert plan(net, 0.3, "unstructured", "magnitude", cfg, calibration=calib).config.mix_rule is None
    # with 2:4 on every eligible layer the mix removes 50 % at most: a 49 % target is met closely, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan(net, 0.3, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="size"))
    lone = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4), nn.Linear(4, 2))  # one big layer: 0 % or 48 %
    with pytest.warns(UserWarning, match="whole layers take 2:4"):
        plan(lone, 0.2, "auto", "magnitude", PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="size"))


def test_measured_damage_of_a_layer_only_some_batches_reach() -> None:
    """A conditionally run layer (an expert): measured where it ran; unknown where it never ran; in memory or offloaded."""
    import copy

    from mp_plugin.budget.mix_measured import measured_kn_damage

    class _Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.never = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) if x.shape[0] > 4 else h  # b only runs on the larger batch

    torch.manual_seed(0)
    net = _Routed()
    batches = [torch.randn(8, 8), torch.randn(3, 8)]
    ref = measured_kn_damage(net, ["a", "b", "never"], batches)
    assert ref["a"] > 0 and ref["b"] > 0 and np.isnan(ref["never"])
    accelerate = pytest.importorskip("accelerate")
    offloaded = copy.deepcopy(net)
    accelerate.cpu_offload(offloaded, execution_device="cpu")
    d = measured_kn_damage(offloaded, ["a", "b", "never"], batches)
    assert d["a"] == pytest.approx(ref["a"], rel=1e-5) and d["b"] == pytest.approx(ref["b"], rel=1e-5)
    assert np.isnan(d["never"])


def test_measured_damage_refuses_a_computed_weight_and_keeps_every_train_flag() -> None:
    from torch.nn.utils import parametrizations

    from mp_plugin.budget.mix_measured import measured_kn_damage

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a model in training
    x = torch.randn(16, 8)
    d = measured_kn_damage(net, ["0", "2"], [x])
    assert d["0"] > 0 and net.training and net[0].training and not net[1].training
    parametrizations.weight_norm(net[2])
    with pytest.raises(ConfigError, match="computed on every access"):
        measured_kn_damage(net, ["2"], [x])


def test_mix_scores_with_nan_and_numpy_values_save_as_strict_json(net: _Net, tmp_path) -> None:
    import json
    import math

    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    scores = {n: np.float32(i) for i, n in enumerate(names)}
    scores[names[0]] = float("nan")
    cfg = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule="scores", mix_scores=scores)
    p = plan(net, 0.3, "auto", "magnitude", cfg)
    p.save(tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in plan.json"))
    back = PrunePlan.load(tmp_path / "plan.json").config.mix_scores
    assert math.isnan(back[names[0]]) and back[names[1]] == 1.0
