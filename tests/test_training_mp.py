"""Training-time MP pruning: the schedule-driven callback, low-rank split, refits, L1+L2, 2025 shrink, real run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fashion_mnist_setup import fashion_mnist_or_skip
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.classifier_training import TrainConfig, accuracy, train_classifier
from mp_plugin.recover.training_mp import (
    ConstantKeep,
    LinearDecayKeep,
    MPSingularValuePruning,
    elastic_net_penalty,
    refit_truncated,
    regulariser_shrink,
)
from mp_plugin.spectrum import fit_marchenko_pastur


def spiked(n: int, m: int, rank: int = 6, sigma: float = 0.05, seed: int = 0) -> torch.Tensor:
    """(n, m) Gaussian noise of entry std ``sigma`` plus a rank-``rank`` signal well above the MP edge."""
    g = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(n, m, generator=g)
    u = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    strength = sigma * math.sqrt(max(n, m)) * torch.linspace(4.0, 8.0, rank)
    return noise + (u * strength) @ v.T


def spiked_mlp(sizes=(300, 200, 150, 10), seed: int = 0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(spiked(b, a, rank=min(6, b - 2), seed=seed + i))
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_schedules():
    assert ConstantKeep()(7) == 0.45
    assert LinearDecayKeep(200)(0) == 1.0 and LinearDecayKeep(200)(100) == 0.5 and LinearDecayKeep(200)(300) == 0.0


@pytest.mark.parametrize(
    "schedule,epoch", [(ConstantKeep(0.45), 4), (LinearDecayKeep(200), 40), (ConstantKeep(0.0), 4)]
)
def test_rank_after_step_is_spikes_plus_scheduled_bulk(schedule, epoch):
    model = spiked_mlp()
    fits = {i: fit_marchenko_pastur(model[i].weight.detach()) for i in (0, 2, 4)}
    top = {i: torch.linalg.svdvals(model[i].weight.detach()) for i in (0, 2, 4)}
    cb = MPSingularValuePruning(every=4, schedule=schedule)
    assert cb(model, epoch - 1) is None  # not a pruning epoch: nothing happens
    step = cb(model, epoch)
    f = schedule(epoch)
    assert step is not None and step.keep_fraction == f and len(step.layers) == 3
    for rec, i in zip(step.layers, (0, 2, 4)):
        p, spikes = min(rec.shape), fits[i].n_spikes
        assert rec.n_spikes == spikes and spikes >= 4  # the planted signal is found
        expected = min(p, max(10, spikes + math.floor(f * (p - spikes))))  # floor: output size 10
        assert rec.kept == expected
        # Kept singular values are unchanged (spikes included), the rest are gone (float32 round-off only).
        s_after = torch.linalg.svdvals(model[i].weight.detach())
        assert int((s_after > 1e-5 * s_after[0]).sum()) == expected
        assert torch.allclose(s_after[:expected], top[i][:expected], rtol=1e-4, atol=1e-5)
    # The head (10 × 150) is floored at the output size and left at full rank.
    assert step.layers[-1].kept == 10


def test_low_rank_split_matches_recomposed_weight_and_updates_optimizer():
    model = spiked_mlp((300, 200, 150, 10))
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 300)
    model(x).square().mean().backward()
    opt.step()
    twin.load_state_dict(model.state_dict())
    old_bias = model[0].bias
    step = MPSingularValuePruning(every=1, schedule=ConstantKeep(0.1), split=True).step(model, 1, opt)
    MPSingularValuePruning(every=1, schedule=ConstantKeep(0.1), split=False).step(twin, 1)
    assert step.replaced == ["0", "2"]  # r·(N+M) < N·M there; the head does not qualify
    assert isinstance(model[0], nn.Sequential) and model[0][0].out_features == step.layers[0].kept
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-5)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    assert id(old_bias) not in ids and model[0][1].bias in opt.state  # momentum of the bias carried over
    model(x).square().mean().backward()
    opt.step()  # the optimizer trains the new layers
    # A later step treats the split halves as ordinary Linear layers.
    names = [r.name for r in MPSingularValuePruning(every=1, schedule=ConstantKeep(0.5)).step(model, 2).layers]
    assert names == ["0.0", "0.1", "2.0", "2.1", "4"]


def test_refit_after_truncation_recovers_the_noise_level():
    w = spiked(256, 512, rank=5, sigma=0.05)
    cb = MPSingularValuePruning(every=1, schedule=ConstantKeep(0.3), min_rank=1)
    layer = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    cb.step(layer, 1)
    kept = cb.history[0].layers[0].kept
    with torch.no_grad():  # training regrows the dropped directions only slightly
        layer.weight.add_(1e-3 * torch.randn(256, 512, generator=torch.Generator().manual_seed(1)))
    plain = fit_marchenko_pastur(layer.weight.detach())
    refit = refit_truncated(plain, kept)
    assert plain.sigma < 0.035  # the naive fit is fooled by the regrown tail
    assert abs(refit.sigma - 0.05) / 0.05 < 0.08 and refit.n_spikes == 5
    rec = cb.step(layer, 2).layers[0]
    assert rec.n_spikes == 5 and rec.kept == 5 + math.floor(0.3 * 251)  # the rank does not jump back up


def test_elastic_net_penalty_value_and_gradient():
    model = spiked_mlp((30, 20, 10))
    pen = elastic_net_penalty(model, l1=1e-3, l2=1e-2)
    ws = [model[0].weight, model[2].weight]
    expected = sum(1e-3 * w.abs().sum() + 1e-2 * w.square().sum() for w in ws)
    assert torch.allclose(pen, expected)
    pen.backward()
    assert model[0].weight.grad is not None and model[0].bias.grad is None  # biases are not penalised


def test_regulariser_shrink_reduces_penalty_and_keeps_zeros_exact():
    model = spiked_mlp((120, 80, 10))
    with torch.no_grad():
        model[0].weight.mul_((torch.rand(80, 120) > 0.5).float())
    zero_mask = model[0].weight == 0
    bias = model[0].bias.detach().clone()
    report = regulariser_shrink(model, steps=150, lr=1e-3, l1=1e-3, l2=1e-3, group_lasso=1e-2)
    assert report.penalty_after < 0.9 * report.penalty_before
    assert torch.equal(model[0].weight == 0, zero_mask)  # no zero revived, no new exact zero needed
    assert report.zeros == int(zero_mask.sum())
    assert torch.equal(model[0].bias, bias)
    assert all(0.0 < c <= 1.0 for c in report.layer_scale.values())
    assert model[0].weight.grad is None and model[0].weight.requires_grad
    with pytest.raises(MPPluginError):
        regulariser_shrink(model, steps=1, cycle=0)


def test_bad_schedule_is_refused():
    with pytest.raises(MPPluginError, match="keep fraction"):
        MPSingularValuePruning(every=1, schedule=lambda e: 1.5).step(spiked_mlp(), 1)
    with pytest.raises(MPPluginError):
        MPSingularValuePruning(every=0)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def test_short_real_fashion_mnist_run_mp_keeps_accuracy_with_fewer_singular_values(capsys):
    train, test = fashion_mnist_or_skip()
    train, test = train.subset(5000, seed=0), test.subset(2000, seed=0)
    epochs = 4
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, seed=0)
    results = {}
    for arm in ("none", "mp", "l1l2", "mp+l1l2"):
        model = _mlp(0)
        cb = MPSingularValuePruning(every=1, schedule=LinearDecayKeep(2 * epochs)) if "mp" in arm else None
        pen = (lambda m: elastic_net_penalty(m, 1e-6, 1e-6)) if "l1l2" in arm else None
        train_classifier(model, train.images, train.labels, cfg, penalty=pen, on_epoch_end=cb)
        kept = cb.history[-1].kept_singular_values / cb.history[-1].total_singular_values if cb else 1.0
        results[arm] = (accuracy(model, test.images, test.labels), kept)
    with capsys.disabled():
        effect = "appears" if results["mp"][0] > results["none"][0] + 0.01 else "does not appear"
        print(f"\nFashion-MNIST 5k/2k, {epochs} epochs: " + ", ".join(f"{k} {a:.2%} (SV kept {r:.0%})"
              for k, (a, r) in results.items()) + f"; the 2023 'MP raises accuracy' effect {effect} here")  # fmt: skip
    base = results["none"][0]
    assert base > 0.72  # a real classifier (chance is 10%)
    for arm in ("mp", "mp+l1l2"):
        acc, kept = results[arm]
        assert acc > base - 0.04, (arm, acc, base)
        assert kept < 0.6  # f ends at 0.5: about half of the singular values are gone
    assert results["l1l2"][0] > base - 0.04
