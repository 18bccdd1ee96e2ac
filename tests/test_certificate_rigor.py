"""Bound mode says "proven" only where its bound holds: what it must refuse, and its rounding allowance.

Each case here was a counterexample: a sample marked as provably keeping its prediction
whose prediction flips, or an η below the true logit change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mp_plugin.certificate import certify
from mp_plugin.certificate.lipschitz import sequential_bound
from mp_plugin.errors import CertificateInputError, NotCertifiable

torch.set_num_threads(1)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _pruned(dense: nn.Sequential, layer: int = 0, keep: float = 0.5, seed: int = 1) -> nn.Sequential:
    pruned = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = pruned[layer].weight
        w.mul_((torch.rand(w.shape, generator=g) < keep).to(w.dtype))
    return pruned


def _sound(cert, dense: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    """η bounds the float32 shift of every sample up to the rounding allowance; no sample marked preserved flips."""
    with torch.no_grad():
        zd, zp = dense(x).double(), pruned(x).double()
    shift = (zd - zp).abs().amax(1)
    allowance = 1e-4 * (zd.abs().amax(1) + zp.abs().amax(1))
    assert bool((shift <= torch.as_tensor(cert.eta) + allowance).all())
    flipped = (zd.argmax(1) != zp.argmax(1)).numpy()
    assert not (cert.preserved & flipped).any()


def test_a_negative_avgpool_divisor_counts_by_its_size() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, divisor_override=-4), nn.Flatten(), nn.Linear(32, 3)
    ).eval()
    pruned = _pruned(dense)
    x = torch.randn(64, 4, 4, 4)
    cert = certify(dense, pruned, x, mode="bound", gaussian=False)
    assert (cert.eta >= 0).all() and cert.claim == "proven"
    _sound(cert, dense, pruned, x)
    assert "AvgPool2d 1" in " ".join(cert.layers[0].ops)  # |k/d| = 4/4


@pytest.mark.parametrize("where", ["downstream", "pre-hook on the pruned layer", "root", "global"])
def test_bound_mode_refuses_forward_hooks(where: str) -> None:
    dense = _mlp()
    handles = []
    if where == "downstream":
        handles.append(dense[1].register_forward_hook(lambda m, i, o: 50.0 * o))
    elif where == "root":
        handles.append(dense.register_forward_hook(lambda m, i, o: 50.0 * o))
    elif where == "global":
        handles.append(nn.modules.module.register_module_forward_hook(lambda m, i, o: None))
    else:
        handles.append(dense[0].register_forward_pre_hook(lambda m, a: (3.0 * a[0],)))
    pruned = _pruned(dense)  # deepcopy keeps the module hooks
    try:
        with pytest.raises(NotCertifiable, match="hook"):
            certify(dense, pruned, torch.randn(8, 16), mode="bound", gaussian=False)
        with pytest.raises(NotCertifiable, match="hook"):
            sequential_bound(dense, "0")
        empirical = certify(dense, pruned, torch.randn(8, 16), mode="empirical")  # measured: still fine
        assert empirical.claim == "measured"
    finally:
        for h in handles:
            h.remove()


def test_bound_mode_refuses_a_replaced_forward() -> None:
    dense = _mlp()
    pruned = _pruned(dense)
    base = pruned[1].forward
    pruned[1].forward = lambda x: 10.0 * base(x)
    with pytest.raises(NotCertifiable, match="replaces the forward"):
        certify(dense, pruned, torch.randn(8, 16), mode="bound", gaussian=False)


class _StdLinear(nn.Linear):
    """A Linear whose weight is standardised per row on the fly: its output is not linear in the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5)
        return nn.functional.linear(x, w, self.bias)


def test_bound_mode_refuses_a_pruned_layer_that_overrides_its_forward() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(_StdLinear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    pruned = _pruned(dense, keep=0.2)
    x = torch.randn(256, 16)
    with pytest.raises(NotCertifiable, match="forward differs from Linear"):
        certify(dense, pruned, x, mode="bound", gaussian=False)


def test_bound_mode_refuses_a_pruned_weight_tied_to_another_layer() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    dense = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(16, 4)).eval()
    pruned = _pruned(dense)  # prunes the shared tensor: both layers
    x = torch.randn(32, 16)
    for layers in (["0"], None):
        with pytest.raises(NotCertifiable, match="tied"):
            certify(dense, pruned, x, mode="bound", layers=layers, sequential=True, gaussian=False)
    cert = certify(dense, pruned, x, mode="empirical", layers=["0"])
    assert any("tied" in note for note in cert.notes)


def test_bound_mode_refuses_autocast_and_low_precision() -> None:
    dense = _mlp()
    pruned = _pruned(dense)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(NotCertifiable, match="autocast"):
        certify(dense, pruned, x, mode="bound", gaussian=False)
    for precision in (torch.bfloat16, torch.float16):
        with pytest.raises(CertificateInputError, match="precision"):
            certify(dense, pruned, x, mode="bound", gaussian=False, precision=precision)
    assert certify(dense, pruned, x, mode="bound", gaussian=False, precision=torch.float32).claim == "proven"


def test_bound_mode_refuses_models_whose_hyperparameters_differ() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.01), nn.Linear(32, 4)).eval()
    pruned = _pruned(dense)
    pruned[1].negative_slope = 3.0
    with pytest.raises(NotCertifiable, match="negative_slope"):
        certify(dense, pruned, torch.randn(8, 16), mode="bound", gaussian=False)


def test_a_margin_only_rounding_could_flip_is_not_claimed() -> None:
    """One weight of 0.1 ulp removed: exact η is below the margin, the float32 logits tie after pruning."""
    ulp = float(torch.finfo(torch.float32).eps)
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0], [0.45 * ulp, 0.1 * ulp]]))
        layer.bias.fill_(1.0)
    dense = nn.Sequential(layer).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight[1, 1] = 0.0
    x = torch.ones(1, 2)
    cert = certify(dense, pruned, x, mode="bound", gaussian=False)
    assert float(cert.margin_pred[0]) > 2 * float(cert.eta[0])  # the exact-arithmetic test would claim it
    assert not cert.preserved[0] and cert.violations == 0
    assert any("rounding allowance" in note for note in cert.notes)
    loose = certify(dense, pruned, x, mode="bound", gaussian=False, rounding_rtol=0.0)
    # without the allowance the margin test alone would claim it; the computed predictions differ, so it is not
    assert not loose.preserved[0] and loose.violations == 0
    assert any("computed predictions differ" in note for note in loose.notes)
    with pytest.raises(CertificateInputError, match="rounding_rtol"):
        certify(dense, pruned, x, mode="bound", gaussian=False, rounding_rtol=-1.0)


def test_the_bound_stays_sound_on_random_chains_with_the_allowance() -> None:
    torch.manual_seed(3)
    claimed = 0
    for seed in range(5):
        dense = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5)).eval()
        with torch.no_grad():
            dense[4].bias += torch.linspace(0.0, 4.0, 5)  # margins of a few logits
        pruned = _pruned(dense, layer=2 * (seed % 3), keep=0.95, seed=seed)
        x = torch.randn(512, 12)
        cert = certify(dense, pruned, x, mode="bound", gaussian=False)
        _sound(cert, dense, pruned, x)
        claimed += int(cert.preserved.sum())
    assert claimed > 500  # not vacuous: of 2560 samples (the first layer's bound is loose)


def test_tied_logits_give_the_same_prediction_in_both_models() -> None:
    dense = nn.Sequential(nn.Linear(2, 4)).eval()
    with torch.no_grad():
        dense[0].weight.zero_()
        dense[0].bias.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    cert = certify(dense, copy.deepcopy(dense), torch.zeros(3, 2), mode="empirical")
    assert (cert.pred_dense == cert.pred_pruned).all() and cert.measured["agreement"] == 1.0


# ------------------------------------------------------------------ a second audit's counterexamples


def test_cancellation_inside_the_network_cannot_mark_a_flipped_sample_preserved() -> None:
    """The allowance scales with the logits; a large value cancelled by a bias hides rounding it does not see.
    A sample counts only when the computed predictions agree as well."""
    u = 2.0**-23
    dense = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1), nn.Linear(1, 2))
    with torch.no_grad():
        dense[0].weight.copy_(torch.tensor([[1.0, 6e-8]]))
        dense[1].weight.fill_(1.0)
        dense[1].bias.fill_(-1.0)
        dense[2].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        dense[2].bias.copy_(torch.tensor([u / 4, -u / 4]))
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight[0, 1] = 0
    x = torch.tensor([[1.0, 1.0]])
    for sequential in (False, True):
        c = certify(dense, pruned, x, mode="bound", sequential=sequential)
        flipped = c.pred_dense != c.pred_pruned
        assert not bool((c.preserved & flipped).any())


def test_bound_mode_refuses_a_precision_coarser_than_the_weights() -> None:
    dense = nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 2)).double()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight[0, 0] = 0
    with pytest.raises(NotCertifiable, match="coarser"):
        certify(dense, pruned, torch.randn(3, 2, dtype=torch.float64), mode="bound", precision=torch.float32)


def test_hyperparameters_outside_extra_repr_and_class_changes_are_refused() -> None:
    dense = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(1, 2))
    pruned = copy.deepcopy(dense)
    pruned[1].divisor_override = 1  # a sum pool: AvgPool2d.extra_repr does not show it
    with torch.no_grad():
        pruned[0].weight.mul_(0.999)
    x = torch.ones(1, 1, 2, 2)
    for sequential in (False, True):
        with pytest.raises(NotCertifiable, match="divisor_override"):
            certify(dense, pruned, x, mode="bound", sequential=sequential)


def test_batchnorm_with_a_negative_running_variance_is_refused() -> None:
    dense = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        dense[1].running_var.fill_(-9.999999e-6)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight.mul_(0.9)
    with pytest.raises(NotCertifiable, match="running_var"):
        certify(dense, pruned, torch.tensor([[1e-6]]), mode="bound")
