"""plan(): breadth over timm architectures and the real pretrained models, save/load, table, plots, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TIMM_ARCHS
from mp_plugin.integrations.plotting import plot_plan
from torch import nn

import mp_plugin as mp
from mp_plugin.cli.main import main as cli_main
from mp_plugin.masks.counts import prune_target

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_plan_across_timm_architectures(arch: str) -> None:
    model = timm.create_model(arch, pretrained=False)
    p = mp.plan(model, sparsity=0.6, method="seb")
    assert len(p.layers) >= 8
    assert sum(lp.n_prune for lp in p.layers) == prune_target(0.6, p.total_weights)
    assert all(lp.fit is not None for lp in p.layers)
    assert not any(lp.name == "head" or lp.name.endswith(".fc") and lp.shape[0] == 1000 for lp in p.layers)
    p24 = mp.plan(model, sparsity=0.5, pattern="2:4")
    for lp in p24.layers:
        assert lp.pattern == ("2:4" if lp.shape[1] % 4 == 0 else "dense")


def test_plan_on_real_pretrained_efficientnet(efficientnet_lite0: nn.Module, tmp_path) -> None:
    p = mp.plan(efficientnet_lite0, sparsity=0.5, budget="seb", model_name="efficientnet_lite0")
    assert len(p.layers) == 32  # 16 project + 15 expand 1×1 convs + the 1×1 head conv
    skipped = {s["reason"] for s in p.skipped}
    assert "grouped/depthwise conv" in skipped and "classifier head" in skipped
    # trained weights: spikes above the MP bulk in most layers, and w_ℓ really varies
    assert sum(lp.fit.n_spikes > 0 for lp in p.layers) >= 24
    assert max(lp.w for lp in p.layers) > 1.2 and min(lp.w for lp in p.layers) < 0.8
    assert sum(lp.n_prune for lp in p.layers) == prune_target(0.5, p.total_weights)
    path = p.save(tmp_path / "plan.json")
    q = mp.PrunePlan.load(path)
    assert q.to_dict() == p.to_dict()
    assert q.layers[3].fit.singular_values.tolist() == p.layers[3].fit.singular_values.tolist()
    table = q.to_table()
    assert "_blocks.15._project_conv" in table and "planned s=0.5000" in table
    figs = plot_plan(q, tmp_path / "plots", max_layers=6)
    assert [f.name for f in figs] == ["esd.png", "budgets.png"] and all(f.stat().st_size > 5000 for f in figs)


def test_plan_on_real_minilm_finds_spikes_and_noise_pooler(minilm: nn.Module) -> None:
    p = mp.plan(minilm, sparsity=0.5)
    assert len(p.layers) == 37
    enc = [lp for lp in p.layers if ".layer." in lp.name]
    spike_share = sum(1 - lp.fit.bulk_fraction for lp in enc) / len(enc)
    assert 0.05 < spike_share < 0.35  # trained encoder layers: a clear share of spikes
    pooler = p.layer("encoder.pooler.dense")
    assert pooler.fit.bulk_fraction > 0.99 and pooler.fit.fit_error < 0.02  # untrained pooler: pure MP noise


@pytest.mark.parametrize("pattern", ["auto"])
def test_auto_pattern_rounds_to_deployable(pattern: str) -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    p = mp.plan(model, sparsity=0.6, pattern=pattern)
    assert {lp.pattern for lp in p.layers} <= {"dense", "12:16", "2:4"}


def test_plan_config_roundtrip_and_methods(tmp_path) -> None:
    model = timm.create_model("resnet18", pretrained=False)
    cfg = mp.PlanConfig(estimator="bema", edge_compat="authors", alpha=0.2, beta=0.1)
    for method in ("seb", "seb-hill", "magnitude", "uniform"):
        p = mp.plan(model, sparsity=0.7, method=method, config=cfg)
        assert sum(lp.n_prune for lp in p.layers) == prune_target(0.7, p.total_weights)
        q = mp.PrunePlan.load(p.save(tmp_path / f"{method}.json"))
        assert q.config.estimator == "bema" and q.method == method
    assert all(lp.w == 1.0 for lp in p.layers)


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(mp.NoPrunableLayersError):
        mp.plan(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(mp.InvalidSparsityError):
        mp.plan(nn.Linear(8, 8), sparsity=1.0)
    with pytest.raises(mp.InvalidSparsityError):
        mp.plan(nn.Linear(8, 8), sparsity=-0.2)
    with pytest.raises(mp.PatternError):
        mp.plan(nn.Linear(8, 8), pattern="3:2")
    with pytest.raises(mp.MPPluginError, match="unknown budget method"):
        mp.plan(nn.Linear(8, 8), budget="nope")
    bad = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(mp.InvalidWeightError, match="NaN"):
        mp.plan(bad)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(mp.InvalidWeightError, match="meta"):
        mp.plan(meta)


def test_plan_handles_tiny_and_low_precision_layers() -> None:
    model = nn.Sequential(nn.Linear(64, 1), nn.Linear(32, 48).to(torch.bfloat16), nn.Linear(48, 32).half())
    p = mp.plan(model, sparsity=0.5)
    assert p.skipped == [{"name": "0", "reason": "matrix 1×64 smaller than min_dim=2"}]
    assert p.layers[0].fit is not None and p.layers[1].fit is not None
    sel = mp.LayerSelection(min_dim=1)
    p = mp.plan(model, sparsity=0.5, config=mp.PlanConfig(selection=sel))
    assert p.layers[0].fit is None and "single singular value" in p.layers[0].note
    assert p.layers[0].w == 1.0  # no fit: neutral weight
    assert sum(lp.n_prune for lp in p.layers) == prune_target(0.5, p.total_weights)


def test_plan_load_rejects_unknown_schema(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(mp.MPPluginError, match="schema"):
        mp.PrunePlan.load(path)


def test_plan_check_model_detects_mismatch() -> None:
    p = mp.plan(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), sparsity=0.5)
    with pytest.raises(mp.PlanMismatchError):
        p.check_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)))


def test_cli_analyze_timm_and_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "a"
    assert cli_main(["analyze", "resnet18", "--random-init", "--out", str(out), "--sparsity", "0.6", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "planned s=0.6000" in text
    assert mp.PrunePlan.load(out / "plan.json").sparsity == 0.6
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    ckpt = tmp_path / "m.pt"
    torch.save(model, ckpt)
    assert cli_main(["analyze", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "budgets.png").exists()
    assert cli_main(["analyze", "resnet18", "--random-init", "--sparsity", "1.5", "--out", str(tmp_path / "c")]) == 2
    assert "sparsity must lie in [0, 1)" in capsys.readouterr().err


def test_reuse_fits_gives_the_same_plan_without_refitting(efficientnet_lite0: nn.Module) -> None:
    first = mp.plan(efficientnet_lite0, sparsity=0.6, method="seb")
    again = mp.plan(efficientnet_lite0, sparsity=0.6, method="seb", reuse_fits=first)
    assert [lp.fit for lp in again.layers] == [lp.fit for lp in first.layers]
    assert all(a.fit is b.fit for a, b in zip(again.layers, first.layers))  # taken over, not recomputed
    assert [lp.n_prune for lp in again.layers] == [lp.n_prune for lp in first.layers]
