"""Masks: exact k:n groups, exact global counts, and MaskKeeper holding masks through training."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp

from mp_plugin import MaskKeeper, PatternError, PlanMismatchError
from mp_plugin.masks.select import (
    assert_kn_exact,
    check_nm,
    global_unstructured_masks,
    kn_group_counts,
    nm_mask,
    unstructured_mask,
)


@pytest.mark.parametrize("k,n", [(1, 2), (2, 4), (4, 8), (6, 12), (8, 16), (12, 16), (3, 7)])
def test_nm_mask_every_group_exact(k: int, n: int) -> None:
    w = torch.randn(24, 5 * n, 3, 1)[:, :, 0, 0] if n != 7 else torch.randn(24, 35)
    mask = nm_mask(w, k, n)
    counts = kn_group_counts(mask, n)
    assert bool((counts == k).all())
    assert_kn_exact(mask, k, n)
    assert check_nm(w * mask, k, n)
    # the kept entries are the k largest of each group
    groups = w.abs().reshape(24, -1, n)
    kept_min = torch.where(mask.reshape(24, -1, n), groups, torch.inf).amin(-1)
    dropped_max = torch.where(mask.reshape(24, -1, n), -torch.inf, groups).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_mask_conv_groups_run_along_input_channels() -> None:
    w = torch.randn(8, 8, 3, 3)
    mask = nm_mask(w, 2, 4)
    assert mask.shape == w.shape
    # TensorRT's conv layout: at every (out, r, s), each run of 4 input channels keeps exactly 2
    per_position = mask.permute(0, 2, 3, 1).reshape(8, 3, 3, 2, 4).sum(-1)
    assert bool((per_position == 2).all())
    assert bool((kn_group_counts(mask, 4) == 2).all())
    # ... and not the flattened C_in·kh·kw row (which would mix kernel positions)
    flat = mask.reshape(8, -1, 4).sum(-1)
    assert not bool((flat == 2).all())


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (16, 12, 5), (16, 8, 1, 1), (8, 16)])
def test_nm_mask_matches_modelopt_magnitude_mask(shape: tuple[int, ...]) -> None:
    """Independent reference: ModelOpt's own ASP-style 2:4 mask (apex layout) for Linear, Conv1d, Conv2d."""
    magnitude = pytest.importorskip("modelopt.torch.sparsity.weight_sparsity.magnitude")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = magnitude.create_asp_mask(torch.nn.Parameter(w.clone()), magnitude.BaseSparseSearcher._pattern_2_4)
    assert torch.equal(nm_mask(w, 2, 4), ref)


def test_nm_mask_refuses_channels_not_divisible_by_n() -> None:
    with pytest.raises(PatternError):
        nm_mask(torch.randn(8, 6, 2, 2), 2, 4)  # 24 flattened inputs would split into 4s, 6 channels do not


def test_assert_kn_exact_catches_bad_groups() -> None:
    mask = nm_mask(torch.randn(4, 8), 2, 4)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(PatternError, match="1 of 8 groups"):
        assert_kn_exact(mask, 2, 4)


@pytest.mark.parametrize("k,n", [(4, 4), (0, 4), (2, 32)])
def test_nm_mask_rejects_bad_patterns(k: int, n: int) -> None:
    with pytest.raises(PatternError):
        nm_mask(torch.randn(4, 32), k, n)


def test_nm_mask_rejects_indivisible_width() -> None:
    with pytest.raises(PatternError, match="not divisible"):
        nm_mask(torch.randn(4, 10), 2, 4)


def test_unstructured_count_exact_with_ties() -> None:
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 0.0, 3.0]])
    for c in range(w.numel() + 1):
        assert int((~unstructured_mask(w, c)).sum()) == c


@pytest.mark.parametrize("layer_w", [None, [1.0, 2.0, 0.5]])
def test_global_masks_exact_total_and_seb_weighting(layer_w) -> None:
    weights = [torch.randn(30, 20), torch.randn(50, 40), torch.randn(16, 8, 3, 3)]
    total = sum(w.numel() for w in weights)
    masks = global_unstructured_masks(weights, 0.37, layer_w)
    pruned = [int((~m).sum()) for m in masks]
    assert sum(pruned) == round(0.37 * total)
    lw = layer_w or [1.0, 1.0, 1.0]
    # global threshold on |W|/w: every pruned score ≤ every kept score
    pruned_scores = torch.cat([(w.abs() / s)[~m] for w, m, s in zip(weights, masks, lw)])
    kept_scores = torch.cat([(w.abs() / s)[m] for w, m, s in zip(weights, masks, lw)])
    assert pruned_scores.max() <= kept_scores.min()
    if layer_w is not None:  # the layer with w=2 is pruned more than the one with w=0.5
        frac = [p / w.numel() for p, w in zip(pruned, weights)]
        assert frac[1] > frac[0] > frac[2]


def _prune_mlp(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(nm_mask(mod.weight, 2, 4))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 20) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_mask_keeper_holds_through_adamw_steps() -> None:
    model = make_mlp((32, 64, 64, 16))
    _prune_mlp(model)
    zeros_before = {n: (p == 0) for n, p in model.named_parameters() if n.endswith("weight")}
    keeper = MaskKeeper(model)
    assert set(keeper.masks) == {"0", "2", "4"}
    assert keeper.sparsity == pytest.approx(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    keeper.attach(opt)
    _train(model, opt)
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(p == 0, zeros_before[name]), name
            assert check_nm(p, 2, 4)
    # kept weights did train
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_without_keeper_the_masks_drift_and_detach_stops_it() -> None:
    model = make_mlp((32, 64, 64, 16))
    _prune_mlp(model)
    keeper = MaskKeeper(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    keeper.attach(opt)
    keeper.detach()
    _train(model, opt, steps=3)
    assert not check_nm(model[0].weight, 2, 4)
    keeper.apply()
    assert check_nm(model[0].weight, 2, 4)


def test_mask_keeper_state_dict_round_trip() -> None:
    model = make_mlp((32, 64, 16))
    _prune_mlp(model)
    state = MaskKeeper(model).state_dict()
    fresh = make_mlp((32, 64, 16), seed=3)  # dense model, different weights
    keeper = MaskKeeper(fresh, masks=state["masks"])
    keeper.apply()
    assert torch.equal(fresh[0].weight == 0, model[0].weight == 0)
    other = MaskKeeper(make_mlp((32, 64, 16), seed=4))
    assert other.masks == {}
    other.load_state_dict(state)
    assert set(other.masks) == {"0", "2"}
    # masks are not model state: the state_dict keys are the plain ones
    assert set(fresh.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_mask_keeper_rejects_wrong_shapes_and_names() -> None:
    model = make_mlp((32, 64, 16))
    with pytest.raises(PlanMismatchError):
        MaskKeeper(model, masks={"0": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(KeyError):
        MaskKeeper(model, masks={"nope": torch.ones(3, 3, dtype=torch.bool)})


def test_zero_grads_gates_gradients_so_sgd_momentum_never_sees_pruned_entries() -> None:
    model = make_mlp((32, 64, 16))
    _prune_mlp(model)
    keeper = MaskKeeper(model, zero_grads=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    keeper.attach(opt)
    _train(model, opt, steps=3)
    for name, mask in keeper.masks.items():
        weight = keeper.weight(name)
        assert not bool(weight.grad[~mask].any()), name  # the gradient hook zeroed held entries
        assert not bool(opt.state[weight]["momentum_buffer"][~mask].any()), name
        assert bool(weight.grad[mask].any())
    assert keeper.violations() == 0
    keeper.detach()
    _train(model, opt, steps=1)
    assert bool(model[0].weight.grad[~keeper.masks["0"]].any())  # hooks gone after detach


def test_gate_lets_only_the_gated_entries_move_and_restores_flags() -> None:
    model = make_mlp((32, 64, 16))
    model[2].bias.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gate = {"0": torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.3}
    with MaskKeeper.gate(model, gate) as keeper:
        assert keeper.hold == "values" and keeper.zero_grads
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.weight"]
        opt = torch.optim.AdamW([model[0].weight], lr=1e-1, weight_decay=0.1)  # decay too: held values come back
        keeper.attach(opt)
        _train(model, opt, steps=4)
        assert keeper.violations() == 0
    moved = model[0].weight.detach() != before["0.weight"]
    assert bool(moved[gate["0"]].any()) and not bool(moved[~gate["0"]].any())
    for name in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(model.get_parameter(name), before[name]), name
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["2.bias"]
    with pytest.raises(Exception, match="hold"):
        MaskKeeper(model, hold="ones")
