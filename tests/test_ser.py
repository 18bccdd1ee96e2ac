"""SER (sparsify–estimate–restore / Spectral Edge Reallocation) and the Hybrid Magnitude–SER schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from distill_data import SmallCNN, make_image_folder
from mp_plugin.integrations.timm import make_loaders

from mp_plugin.errors import MPPluginError
from mp_plugin.masks.counts import prune_target
from mp_plugin.recover.distill import DataConfig, DistillConfig
from mp_plugin.recover.ser import HybridConfig, SERConfig, SpectralEdgeReallocation, hybrid_magnitude_ser

pytest.importorskip("timm")
pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("ser"), n_classes=3, per_class=16)
    return make_loaders(root, SmallCNN(3), 16, DataConfig(input_size=(3, 32, 32), no_aug=True)).train


@pytest.fixture()
def dense():
    torch.manual_seed(0)
    return SmallCNN(3).eval()


def _selection(steps: int = 3) -> DistillConfig:
    return DistillConfig(epochs=3, max_steps=steps, lr=1e-2, weight_decay=0.0, allow_dense=True)


def _targets(model):
    return {n: m.weight for n, m in model.named_modules() if n in ("conv1", "conv2", "conv3", "fc")}


def test_ser_restores_exactly_to_the_target(dense, loader):
    model = copy.deepcopy(dense)
    cfg = SERConfig(selection=_selection(), finetune=DistillConfig(epochs=1, max_steps=2, lr=1e-3))
    result = SpectralEdgeReallocation(cfg).run(model, 0.5, loader, teacher=dense)
    total = sum(w.numel() for w in _targets(model).values())
    assert set(result.masks) == set(_targets(model))
    pruned = sum(int((~m).sum()) for m in result.masks.values())
    assert pruned == prune_target(0.5, total)
    assert result.over_sparsity == pytest.approx(prune_target(0.53, total) / total)
    assert sum(result.restored.values()) == prune_target(0.53, total) - prune_target(0.5, total)
    for name, w in _targets(model).items():  # fine-tuning kept the masks: zeros exactly where masked
        assert torch.equal(w.detach() == 0, ~result.masks[name])
    assert result.finetune is not None and result.finetune.steps == 2


def test_selection_phase_changes_only_reservoir_entries(dense, loader):
    model = copy.deepcopy(dense)
    ser = SpectralEdgeReallocation(SERConfig(selection=_selection(4), finetune=None))
    plan, over, state = ser.overprune(model, 0.4)
    before = copy.deepcopy(model.state_dict())
    delta, steps, _ = ser.select(model, state["reservoir"], loader, reference=dense)
    assert steps == 4
    after = model.state_dict()
    weights = {f"{n}.weight": n for n in over}
    for key, value in after.items():
        if key in weights:
            name = weights[key]
            kept = over[name]
            assert torch.equal(value[kept], before[key][kept]), key  # kept weights frozen, bit for bit
            assert torch.equal(value[~kept & ~state["reservoir"][name]], before[key][~kept & ~state["reservoir"][name]])
        else:
            assert torch.equal(value, before[key]), key  # biases, BatchNorm weights and statistics untouched
    moved = sum(int((delta[n] > 0).sum()) for n in delta)
    assert moved > 0.5 * sum(int(r.sum()) for r in state["reservoir"].values())
    assert all(bool((delta[n][~state["reservoir"][n]] == 0).all()) for n in delta)


def test_rho_option_changes_which_layers_are_restored(dense, loader):
    restored, mean_w = {}, {}
    for rho in ("inverse_w", "w"):
        model = copy.deepcopy(dense)
        torch.manual_seed(0)
        res = SpectralEdgeReallocation(SERConfig(rho=rho, selection=_selection(), finetune=None)).run(
            model, 0.5, loader, teacher=dense
        )
        assert len(set(res.layer_w.values())) > 1  # SEB weights differ between layers at s = 0.53
        restored[rho] = res.restored
        mean_w[rho] = sum(res.layer_w[n] * c for n, c in res.restored.items()) / sum(res.restored.values())
    assert restored["inverse_w"] != restored["w"]
    assert mean_w["inverse_w"] < mean_w["w"]  # 1/w favours low-w (protected) layers, w the opposite


def test_restore_dense_values(dense, loader):
    model = copy.deepcopy(dense)
    original = {n: w.detach().clone() for n, w in _targets(model).items()}
    res = SpectralEdgeReallocation(SERConfig(restore_value="dense", selection=_selection(), finetune=None)).run(
        model, 0.5, loader, teacher=dense
    )
    for name, w in _targets(model).items():
        kept = res.masks[name]
        assert torch.equal(w.detach()[kept], original[name][kept])  # kept + restored entries hold dense values
        assert bool((w.detach()[~kept] == 0).all())


def test_hybrid_follows_its_schedule_with_cumulative_masks(dense, loader):
    model = copy.deepcopy(dense)
    ft = DistillConfig(epochs=1, max_steps=2, lr=1e-3)
    cfg = HybridConfig(
        schedule=(0.1, 0.2, 0.35, 0.5),
        finetune=ft,
        ser=SERConfig(selection=_selection(2), finetune=ft),
    )
    zeros = []
    result = hybrid_magnitude_ser(
        model,
        loader,
        teacher=dense,
        config=cfg,
        on_step=lambda rec, m: zeros.append({n: w.detach() == 0 for n, w in _targets(m).items()}),
    )
    assert [s["method"] for s in result.steps] == ["magnitude", "magnitude", "ser", "ser"]
    total = sum(w.numel() for w in _targets(model).values())
    for rec in result.steps:
        assert rec["achieved"] == pytest.approx(prune_target(rec["sparsity"], total) / total)
        assert rec["finetune_steps"] == 2
    for earlier, later in zip(zeros, zeros[1:]):  # zeros stay zero along the schedule
        assert all(bool((later[n] | ~earlier[n]).all()) for n in earlier)
    assert result.steps[2]["ser"]["over_sparsity"] > 0.35


def test_ser_refuses_a_target_below_the_current_sparsity(dense, loader):
    model = copy.deepcopy(dense)
    ser = SpectralEdgeReallocation(SERConfig(selection=_selection(1), finetune=None))
    ser.run(model, 0.5, loader, teacher=dense)
    with pytest.raises(MPPluginError, match="already sparser"):
        ser.run(model, 0.3, loader, teacher=dense)
    with pytest.raises(MPPluginError):
        SERConfig(rho="sqrt")
    with pytest.raises(MPPluginError):
        HybridConfig(schedule=(0.2, 0.1))


def test_ser_to_kn_projects_exactly_with_a_prior_towards_the_ser_mask(dense, loader):
    from mp_plugin.masks.select import kn_group_counts
    from mp_plugin.recover.ser import ser_to_kn

    model = copy.deepcopy(dense)
    res = SpectralEdgeReallocation(SERConfig(selection=_selection(2), finetune=None)).run(
        model, 0.5, loader, teacher=dense
    )
    calib = next(iter(loader))[0]
    overlap = {}
    for alpha in (0.0, 10.0):
        m = copy.deepcopy(model)
        kn = ser_to_kn(m, dense, res.masks, "2:4", calibration=calib, prior_alpha=alpha)
        for name, w in _targets(m).items():
            assert bool((kn_group_counts(kn[name], 4) == 2).all())
            assert torch.equal(w.detach() != 0, kn[name])  # u·mask: free restoration fills the kept slots
        overlap[alpha] = sum(int((kn[n] & res.masks[n]).sum()) for n in kn)
    assert overlap[10.0] > overlap[0.0]
