"""Soundness of the certificate, property-tested over ≥1000 random ReLU MLPs and random masks."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mp_plugin.certificate import RIGOROUS, certify

SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def pruned_mlps(draw):
    """A random ReLU MLP (widths 3–12), a random mask on random layers, and a batch of 8."""
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(3, 12)) for _ in range(depth + 1)] + [draw(st.integers(2, 6))]
    seed = draw(st.integers(0, 2**31 - 1))
    keep = draw(st.floats(0.3, 0.999))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    g = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(scale * torch.randn(b, a, generator=g) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g))
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    dense = nn.Sequential(*mods).eval()
    pruned = copy.deepcopy(dense)
    linears = [m for m in pruned if isinstance(m, nn.Linear)]
    chosen = draw(st.lists(st.integers(0, len(linears) - 1), min_size=1, max_size=len(linears), unique=True))
    with torch.no_grad():
        for i in chosen:
            w = linears[i].weight
            w.mul_((torch.rand(w.shape, generator=g) < keep).to(w.dtype))
    x = torch.randn(8, widths[0], generator=g)
    labels = torch.randint(0, widths[-1], (8,), generator=g)
    return dense, pruned, x, labels


@SETTINGS
@given(pruned_mlps())
def test_bound_mode_is_sound(case):
    """bound + sequential: no preserved sample flips, CE change ≤ B_T, and η_s ≥ the realised shift."""
    dense, pruned, x, labels = case
    cert = certify(dense, pruned, x, labels, mode="bound", sequential=True, gaussian=False)
    assert cert.eta_kind == RIGOROUS and cert.budget_kind == RIGOROUS
    with torch.no_grad():
        zd, zp = dense(x).double(), pruned(x).double()
    changed = zd.argmax(1) != zp.argmax(1)
    assert not bool((torch.as_tensor(cert.preserved) & changed).any())
    assert cert.violations == 0
    tol = 1e-5 * max(1.0, float(zd.abs().max()))  # the forward passes run in float32
    shift = (zd - zp).abs().amax(1)
    assert bool((shift <= torch.as_tensor(cert.eta) + tol).all())
    ce_change = abs(float(F.cross_entropy(zp, labels) - F.cross_entropy(zd, labels)))
    assert ce_change <= cert.budget + 2 * tol


@SETTINGS
@given(pruned_mlps())
def test_empirical_mode_is_exact(case):
    """empirical: η_s is the measured logit shift and preserved ⇒ same prediction, by construction."""
    dense, pruned, x, labels = case
    cert = certify(dense, pruned, x, labels, mode="empirical")
    with torch.no_grad():
        zd, zp = dense(x).double(), pruned(x).double()
    torch.testing.assert_close(torch.as_tensor(cert.eta), (zd - zp).abs().amax(1), rtol=0, atol=1e-12)
    top = zd.topk(2, dim=1).values
    torch.testing.assert_close(torch.as_tensor(cert.margin_pred), top[:, 0] - top[:, 1], rtol=0, atol=1e-12)
    changed = zd.argmax(1) != zp.argmax(1)
    assert not bool((torch.as_tensor(cert.preserved) & changed).any())
    assert cert.budget == float(2 * cert.eta.mean())
