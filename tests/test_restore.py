"""Prune–restore (ALGORITHM.md §7): the solvers against the closed form, every layer kind, every route in apply."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.errors import MPPluginError
from mp_plugin.layers.calibration import layer_input_rows
from mp_plugin.layers.layout import kn_input_columns, kn_matrix
from mp_plugin.masks.select import check_nm, nm_mask, unstructured_mask
from mp_plugin.pruning.apply_plan import apply
from mp_plugin.restore import (
    RestoreConfig,
    block_key,
    capture_grams,
    forward_blocks,
    obs_sweep,
    restore_cg,
    restore_direct,
    restore_layer,
    restore_model,
)
from mp_plugin.restore.solve import damped


def _all_layers() -> mp.PlanConfig:
    from mp_plugin.layers.discovery import LayerSelection

    return mp.PlanConfig(selection=LayerSelection(exclude_head=False))


def _problem(rows: int = 24, d: int = 32, n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(rows, d, generator=g, dtype=torch.float64)
    h0 = x.T @ x
    h, _ = damped(h0, 0.01)
    return w, h0, h


def _energy(w: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> float:
    d = x - w
    return float(((d @ h) * d).sum())


def test_direct_is_the_closed_form_optimum():
    w, _, h = _problem()
    mask = nm_mask(w, 2, 4)
    x = restore_direct(w, mask, h)
    hinv = torch.linalg.inv(h)
    for i in range(w.shape[0]):
        k, p = mask[i], ~mask[i]
        expect_k = w[i, k] + torch.linalg.solve(h[k][:, k], h[k][:, p] @ w[i, p])
        torch.testing.assert_close(x[i, k], expect_k, rtol=1e-9, atol=1e-9)
        e_star = float(w[i, p] @ torch.linalg.solve(hinv[p][:, p], w[i, p]))
        d = x[i] - w[i]
        assert float(d @ h @ d) == pytest.approx(e_star, rel=1e-8)
    assert bool((x[~mask] == 0).all())


def test_cg_reaches_direct_and_obs_sweep_is_between_masked_and_optimum():
    w, _, h = _problem(rows=40, d=64)
    mask = unstructured_mask(w, w.numel() * 6 // 10)
    xd = restore_direct(w, mask, h)
    xc, iters, res = restore_cg(w, mask, h, tol=1e-10, max_iter=500, fast_products=False)
    assert res <= 1e-10 and iters > 0
    torch.testing.assert_close(xc, xd, rtol=1e-6, atol=1e-7)
    xf, _, _ = restore_cg(w, mask, h, tol=1e-6, max_iter=500)  # float32 products: accurate to ~1e-5
    torch.testing.assert_close(xf, xd, rtol=1e-4, atol=1e-5)
    xo, kept = obs_sweep(w, h, mask=mask, blocksize=16)
    assert torch.equal(kept, mask)
    e_masked, e_obs, e_opt = _energy(w, w * mask, h), _energy(w, xo, h), _energy(w, xd, h)
    assert e_opt <= e_obs * (1 + 1e-12) and e_obs < e_masked


def test_obs_sweep_is_exact_obs_for_a_single_pruned_column():
    # pruning only the first column: the sweep's update is the exact OBS update with all other columns free
    w, _, h = _problem(rows=8, d=16)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 0] = False
    torch.testing.assert_close(obs_sweep(w, h, mask=mask)[0], restore_direct(w, mask, h), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("select", [(2, 4), (4, 8), 24 * 32 // 2])
def test_obs_selection_counts_and_beats_its_mask_only_version(select):
    w, _, h = _problem()
    x, kept = obs_sweep(w, h, select=select, blocksize=16)
    if isinstance(select, tuple):
        assert check_nm(x, *select) and int(kept.sum()) == w.numel() * select[0] // select[1]
    else:
        assert int((~kept).sum()) == select
    assert _energy(w, x, h) < _energy(w, w * kept, h)
    # the exact restore on SparseGPT's own mask is at least as good as its sweep
    assert _energy(w, restore_direct(w, kept, h), h) <= _energy(w, x, h) * (1 + 1e-12)


def _layers():
    return [
        ("linear", nn.Linear(32, 12), torch.randn(5, 7, 32)),
        ("conv1d", nn.Conv1d(16, 8, 3, padding=1), torch.randn(6, 16, 20)),
        ("conv1x1", nn.Conv2d(16, 8, 1), torch.randn(4, 16, 6, 6)),
        ("conv3x3", nn.Conv2d(8, 8, 3, padding=1, stride=2), torch.randn(4, 8, 9, 9)),
        ("grouped", nn.Conv2d(16, 8, 3, padding=1, groups=2), torch.randn(4, 16, 7, 7)),
        ("depthwise", nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(6, 8, 7, 7)),
    ]


def _output_error(layer: nn.Module, weight: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    with torch.no_grad():
        a.weight.copy_(weight)
        b.weight.copy_(dense)
    return float((a(x) - b(x)).detach().double().square().sum())


@pytest.mark.parametrize("kind,layer,x", _layers(), ids=[k for k, _, _ in _layers()])
def test_restore_layer_on_every_layer_kind(kind, layer, x):
    """The recorded error is the real output error, it drops, and the mask, zeros and dtype hold."""
    model = nn.Sequential(layer)
    dense = layer.weight.detach().clone()
    groups = layer.groups if hasattr(layer, "groups") else 1
    n = 4 if layer.weight.shape[1] % 4 == 0 else None
    mask = nm_mask(dense, 2, 4) if n else unstructured_mask(dense, dense.numel() // 2)
    with torch.no_grad():
        layer.weight.mul_(mask)
    gram = capture_grams(model, ["0"], x)["0"]
    masked_err = _output_error(layer, layer.weight, dense, x)
    rec = restore_layer(layer.weight, dense, gram, RestoreConfig(), groups=groups)
    restored_err = _output_error(layer, layer.weight, dense, x)
    total = _output_error(layer, torch.zeros_like(dense), dense, x)
    assert rec["rel_error_before"] == pytest.approx(masked_err / total, rel=1e-6)
    assert rec["rel_error_after"] == pytest.approx(restored_err / total, rel=1e-3, abs=1e-9)
    assert restored_err < masked_err
    assert bool((layer.weight[~mask] == 0).all())
    if n:
        assert check_nm(layer.weight, 2, 4)


def test_gram_layout_matches_kn_matrix():
    conv = nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    gram = capture_grams(nn.Sequential(conv), ["0"], x)["0"]
    cols = kn_input_columns(layer_input_rows(conv, x), 8, 1).double()
    ref_gram = cols.T @ cols
    torch.testing.assert_close(gram.gram[0], ref_gram, rtol=1e-5, atol=1e-6 * float(ref_gram.abs().max()))
    # W_kn · colsᵀ is the conv output without bias
    y = (kn_matrix(conv.weight.detach()).double() @ cols.T).T
    ref = (conv(x) - conv.bias[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, 4).double()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_restore_keeps_dtype_and_exact_zeros_of_a_bf16_layer():
    layer = nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    dense = layer.weight.detach().clone()
    dense[0, :4] = 0  # pre-existing zeros stay zero
    mask = nm_mask(dense, 2, 4) & (dense != 0)
    with torch.no_grad():
        layer.weight.copy_(dense * mask)
    gram = capture_grams(nn.Sequential(layer), ["0"], x)["0"]
    rec = restore_layer(layer.weight, dense, gram, RestoreConfig())
    assert layer.weight.dtype == torch.bfloat16
    assert bool((layer.weight[~mask] == 0).all()) and bool((layer.weight[0, :4] == 0).all())
    assert rec["rel_error_after"] < rec["rel_error_before"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3)])
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def _fidelity(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).square().mean())


@pytest.mark.parametrize("pattern,sparsity", [("2:4", 0.5), ("unstructured", 0.6)])
@pytest.mark.parametrize("method", ["magnitude", "cast", "obs", "cast-obs"])
def test_apply_restore_every_projection(pattern, sparsity, method):
    if method == "cast" and pattern == "unstructured":
        pytest.skip("CAST is a k:n projection")
    torch.manual_seed(1)
    dense = _Net().eval()
    calib = [torch.randn(64, 32) for _ in range(4)]
    test = torch.randn(128, 32)
    results = {}
    for restore in (False, True):
        model = copy.deepcopy(dense)
        p = mp.plan(model, sparsity=sparsity, pattern=pattern, budget="uniform", config=_all_layers())
        apply(model, p, calibration=calib, projection=method, restore=restore)
        report = mp.sparsity_report(model, p)
        if pattern == "unstructured":
            assert report.total_zeros == sum(lp.n_prune for lp in p.layers)
        assert report.kn_valid
        results[restore] = _fidelity(model, dense, test)
        if restore:
            for lp in p.layers:
                rec = p.applied["layers"][lp.name]["restore"]
                assert rec["rel_error_after"] <= rec["rel_error_before"]
            assert p.applied["restore"]["damp"] == 0.01
    assert results[True] < results[False]


def test_sequential_blocks_and_inputs_from_the_pruned_model():
    assert block_key("blocks.3.attn.qkv") == "blocks.3"
    assert block_key("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert block_key("head") == "head"
    assert forward_blocks(["stem", "blocks.0.a", "blocks.0.b", "blocks.1.a", "head"]) == [
        ["stem"],
        ["blocks.0.a", "blocks.0.b"],
        ["blocks.1.a"],
        ["head"],
    ]
    torch.manual_seed(2)
    dense = _Net().eval()
    calib = [torch.randn(96, 32) for _ in range(3)]
    test = torch.randn(128, 32)
    errs = {}
    for seq in (False, True):
        model = copy.deepcopy(dense)
        p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
        apply(model, p, calibration=calib, restore=RestoreConfig(sequential=seq))
        errs[seq] = _fidelity(model, dense, test)
        if seq:
            # the last block's Gram was taken on the model pruned before it: its recorded error is the one on
            # the pruned model's inputs to the head, not on the dense model's
            w = dense.head.weight.double()
            d = model.head.weight.double() - w

            def rel_error(h: torch.Tensor, w: torch.Tensor = w, d: torch.Tensor = d) -> float:
                return float(torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T))

            recorded = p.applied["layers"]["head"]["restore"]["rel_error_after"]
            on_pruned = rel_error(capture_grams(model, ["head"], calib)["head"].gram[0].double())
            on_dense = rel_error(capture_grams(dense, ["head"], calib)["head"].gram[0].double())
            assert recorded == pytest.approx(on_pruned, rel=1e-6)
            assert recorded != pytest.approx(on_dense, rel=1e-3)
    assert errs[True] < errs[False] * 1.05  # sequential is no worse here (it corrects predecessors' error)


def test_restore_model_any_mask_source_and_wanda():
    from mp_plugin.evaluation.baselines import prune_baseline

    torch.manual_seed(3)
    dense = _Net().eval()
    calib = [torch.randn(256, 32) for _ in range(4)]
    test = torch.randn(128, 32)
    pruned = prune_baseline("wanda", copy.deepcopy(dense), sparsity=0.5, pattern="2:4", calibration=calib)
    before = _fidelity(pruned, dense, test)
    recs = restore_model(pruned, dense, calib)
    assert recs and all(r["rel_error_after"] <= r["rel_error_before"] for r in recs.values())
    assert _fidelity(pruned, dense, test) < before
    assert all(
        check_nm(m.weight, 2, 4)
        for m in pruned.modules()
        if isinstance(m, nn.Linear) and m.weight.shape[1] % 4 == 0 and (m.weight == 0).any()
    )


def test_bad_inputs_give_named_errors_or_recorded_fallbacks():
    layer = nn.Linear(32, 8)
    model = nn.Sequential(layer)
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    with pytest.raises(MPPluginError, match="calibration"):
        apply(copy.deepcopy(model), p, calibration=None, restore=True)
    bad = torch.randn(16, 32)
    bad[3, 5] = float("nan")
    with pytest.raises(MPPluginError, match="NaN or Inf"):
        apply(copy.deepcopy(model), p, calibration=bad, restore=True)
    # fewer rows than inputs: restored, and the plan says how many rows are needed
    m2 = copy.deepcopy(model)
    apply(m2, p, calibration=torch.randn(8, 32), restore=True)
    rec = p.applied["layers"]["0"]["restore"]
    assert any("at least 128 rows" in note for note in rec["notes"])
    assert bool(torch.isfinite(m2[0].weight).all())
    # dead inputs (always-zero columns) keep the result finite
    x = torch.randn(64, 32)
    x[:, :8] = 0
    m3 = copy.deepcopy(model)
    apply(m3, p, calibration=x, restore=True)
    assert bool(torch.isfinite(m3[0].weight).all()) and check_nm(m3[0].weight, 2, 4)
    with pytest.raises(MPPluginError):
        RestoreConfig(damp=-1.0)
    with pytest.raises(MPPluginError):
        RestoreConfig(solver="exactly")


def test_layer_never_reached_by_calibration_is_recorded():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.unused = nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x)

    model = TwoHeads()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calibration=torch.randn(64, 16), restore=True)
    assert "not reached" in p.applied["layers"]["unused"]["method"]
    assert check_nm(model.unused.weight, 2, 4)


def test_restore_after_channel_permutation():
    torch.manual_seed(4)
    dense = _Net().eval()
    calib = [torch.randn(512, 32) for _ in range(4)]  # well above d rows per layer, so restore does not overfit
    test = torch.randn(128, 32)
    model = copy.deepcopy(dense)
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calibration=calib, projection="cast-obs", permute=True, restore=True)
    assert mp.sparsity_report(model, p).kn_valid
    plain = copy.deepcopy(dense)
    apply(plain, mp.plan(plain, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers()), permute=True)
    assert _fidelity(model, dense, test) < _fidelity(plain, dense, test)


@pytest.mark.parametrize("pattern,sparsity", [("2:4", 0.5), ("unstructured", 0.6)])
def test_sparsegpt_obs_baseline_against_the_optimum_for_its_own_mask(pattern, sparsity):
    """The own SparseGPT: exact counts/pattern, its update beats mask-only, and is ≥ the closed-form optimum."""
    from mp_plugin.evaluation.baselines import prune_baseline

    torch.manual_seed(5)
    layer = nn.Linear(64, 32, bias=False)
    model = nn.Sequential(layer)
    calib = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3
    dense = layer.weight.detach().clone()
    prune_baseline(
        "sparsegpt-obs", model, sparsity=sparsity, pattern=pattern, calibration=calib, plan_config=_all_layers()
    )
    w = layer.weight.detach().double()
    mask = w != 0
    if pattern == "2:4":
        assert check_nm(w, 2, 4)
    else:
        assert int((~mask).sum()) == math.floor(0.6 * w.numel())  # ⌊s·n⌋ = 1228 of 2048
    h0 = calib.double().T @ calib.double()
    h, _ = damped(h0, 0.01)
    e_sgpt = _energy(dense.double(), w, h)
    e_opt = _energy(dense.double(), restore_direct(dense.double(), mask, h), h)
    e_masked = _energy(dense.double(), dense.double() * mask, h)
    assert e_opt <= e_sgpt * (1 + 1e-9) < e_masked


def test_plan_records_and_prints_restore_and_survives_save_load(tmp_path):
    torch.manual_seed(6)
    model = _Net().eval()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calibration=[torch.randn(256, 32)], restore=RestoreConfig(sequential=True))
    table = p.to_table()
    assert "err restored" in table and "blocks.0.0" in table and "sequential=True" in table
    back = type(p).load(p.save(tmp_path / "plan.json"))
    assert back.applied["restore"] == RestoreConfig(sequential=True).to_dict()
    assert back.applied["layers"]["head"]["restore"] == p.applied["layers"]["head"]["restore"]


def test_bf16_model_with_float32_calibration():
    torch.manual_seed(7)
    dense = _Net().eval().to(torch.bfloat16)
    model = copy.deepcopy(dense)
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calibration=[torch.randn(256, 32)], restore=True)  # float32 batch, bf16 model
    assert all(prm.dtype == torch.bfloat16 for prm in model.parameters())
    assert mp.sparsity_report(model, p).kn_valid
    recs = [p.applied["layers"][lp.name]["restore"] for lp in p.layers]
    assert all(r["rel_error_after"] < r["rel_error_before"] for r in recs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_on_cuda_matches_cpu():
    """Grams, masks and restore run on the weights' device; the CUDA result equals the CPU one."""
    torch.manual_seed(8)
    dense = _Net().eval()
    calib = [torch.randn(256, 32)]
    out = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(dense).to(device)
        p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
        apply(model, p, calibration=[c.to(device) for c in calib], projection="cast-obs", restore=True)
        assert model.head.weight.is_cuda == (device == "cuda")
        out[device] = {n: w.detach().cpu() for n, w in model.state_dict().items()}
    for name, w in out["cpu"].items():
        torch.testing.assert_close(out["cuda"][name], w, rtol=1e-4, atol=1e-5)


def test_restore_table_survives_a_hand_edited_record():
    model = _Net().eval()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calibration=[torch.randn(256, 32)], restore=True)
    p.applied["layers"]["head"]["restore"] = {"rel_error_before": "x", "notes": "one note", "rows": None}
    p.applied["restore"] = "tampered"
    table = p.restore_table()
    assert "one note" in table and "head" in table


def test_apply_with_calibration_keeps_every_submodule_train_flag():
    """A frozen BatchNorm inside a model in training stays frozen through obs projection and restore."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    model.train()
    model[1].eval()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calibration=[torch.randn(64, 16)], projection="obs", restore=RestoreConfig())
    assert model.training and model[0].training and model[3].training and not model[1].training


class _Overflowing(nn.Module):
    """Two blocks; the first overflows to Inf on large inputs, so a sequential restore fails at the second."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](torch.exp(200 * self.blocks[0](x)))


@pytest.mark.parametrize("permute", ["none", "swap"])
def test_a_sequential_restore_that_fails_part_way_records_what_it_did_and_resumes(permute: str):
    torch.manual_seed(0)
    model = _Overflowing().eval()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", config=_all_layers())
    before = copy.deepcopy(model)
    small, large = torch.randn(256, 64) * 1e-3, torch.randn(256, 64)
    with pytest.raises(mp.MPPluginError, match="NaN or Inf") as info:
        apply(model, p, [small, large], restore=RestoreConfig(sequential=True), permute=permute)
    assert "apply the same plan again" in " ".join(getattr(info.value, "__notes__", []))
    first = ["blocks.0.0", "blocks.0.2"]
    assert "incomplete" in p.applied and sorted(p.applied["layers"]) == first
    assert all(check_nm(model.get_submodule(n).weight, 2, 4) for n in first)  # valid in the basis they were cut in
    assert (p.permutation is not None) == (permute == "swap")  # kept and recorded: undoing would break them
    if permute == "none":
        assert torch.equal(model.blocks[1][0].weight, before.blocks[1][0].weight)  # not reached: untouched
    done = {n: model.get_submodule(n).weight.detach().clone() for n in first}
    apply(model, p, [small], restore=RestoreConfig(sequential=True), permute=permute)  # the cause fixed: resume
    assert "incomplete" not in p.applied and len(p.applied["layers"]) == 4
    assert all(check_nm(model.get_submodule(n).weight, 2, 4) for n in p.applied["layers"])
    if permute == "none":
        assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in done.items())  # kept, not redone


@pytest.mark.parametrize("offload", [False, True])
def test_a_layer_interrupted_mid_restore_is_left_dense_in_memory_and_in_a_cpu_offload_store(monkeypatch, offload):
    """Ctrl-C inside one layer's restore: that layer keeps its dense weight, earlier layers stay done."""
    import mp_plugin.restore.driver as driver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "4")}
    if offload:
        accelerate = pytest.importorskip("accelerate")
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # the weight brought in *is* the store
    real = driver.restore_layer

    def interrupted(weight, *args, **kwargs):
        out = real(weight, *args, **kwargs)
        if weight.shape == (32, 64):  # layer "2": already masked and re-solved when the interrupt lands
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(driver, "restore_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply(model, p, [torch.randn(128, 32)], restore=RestoreConfig(sequential=True))
    monkeypatch.undo()

    def weight(name: str) -> torch.Tensor:
        module = model.get_submodule(name)
        return module._hf_hook.weights_map["weight"] if offload else module.weight.detach()

    assert check_nm(weight("0"), 2, 4)  # done before the interrupt
    assert torch.equal(weight("2"), dense["2"])  # the interrupted layer: dense again
    assert torch.equal(weight("4"), dense["4"])  # not reached
    assert "KeyboardInterrupt" in p.applied["incomplete"] and sorted(p.applied["layers"]) == ["0"]
    done = weight("0").clone()
    apply(model, p, [torch.randn(128, 32)], restore=RestoreConfig(sequential=True))  # resumes
    assert "incomplete" not in p.applied and sorted(p.applied["layers"]) == ["0", "2", "4"]
    assert torch.equal(weight("0"), done) and all(check_nm(weight(n), 2, 4) for n in ("2", "4"))


class _CalledTwice(nn.Module):
    """a, b, a inside one block: the second call of a comes after b, the block's last layer by first call."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16)})])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[0]
        return self.head(blk["a"](torch.relu(blk["b"](blk["a"](x)))))


def test_sequential_restore_sees_every_call_of_a_layer_used_twice():
    from mp_plugin.restore.driver import block_grams

    torch.manual_seed(0)
    model = _CalledTwice().eval()
    calib = [torch.randn(32, 16), torch.randn(32, 16)]
    names = ["blocks.0.a", "blocks.0.b", "head"]
    truth = capture_grams(model, names, calib)
    for sequential in (False, True):
        seen = {
            n: g for _, grams in block_grams(model, names, calib, RestoreConfig(), sequential) for n, g in grams.items()
        }
        assert seen["blocks.0.a"].rows == truth["blocks.0.a"].rows == 128  # 2 calls × 64 rows
        torch.testing.assert_close(seen["blocks.0.a"].gram, truth["blocks.0.a"].gram)


def test_restore_layer_keeps_the_given_weights_when_the_solve_overflows_half_precision():
    """Two almost equal inputs: dropping one asks the other to carry 2 × 4e4, beyond float16's 65504."""
    torch.manual_seed(1)
    layer = nn.Linear(8, 2, bias=False).half()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[40000.0, 40000.0, 0, 0, 1, 1, 0, 0]] * 2))
    base = torch.randn(400, 4)
    cols = [base[:, :1], base[:, :1] * 1.0001, base[:, 1:2], base[:, 2:3], base[:, 3:4], base[:, 3:4]]
    x = torch.cat([*cols, torch.randn(400, 2)], 1).half()
    dense = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([[False, True, True, True, True, False, True, True]] * 2))
    given = layer.weight.detach().clone()
    gram = capture_grams(nn.Sequential(layer), ["0"], x)["0"]
    rec = restore_layer(layer.weight, dense, gram, RestoreConfig())
    assert any("overflow" in note for note in rec["notes"]), rec["notes"]
    assert torch.equal(layer.weight.detach(), given) and rec["rel_error_after"] == rec["rel_error_before"]


def test_a_second_apply_keeps_the_restore_records_and_says_when_it_restores_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    calib = [torch.randn(128, 32)]
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calib, restore=RestoreConfig())
    first = copy.deepcopy(p.applied)
    assert all("restore" in e for e in first["layers"].values())
    with pytest.warns(UserWarning, match="nothing was restored"):
        apply(model, p, calib, restore=RestoreConfig(damp=0.5))
    assert p.applied["restore"] == first["restore"] and p.applied["method"] == first["method"]
    assert all(p.applied["layers"][n]["restore"] == first["layers"][n]["restore"] for n in first["layers"])


def test_restore_model_aligns_a_permuted_model_to_its_dense_one():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib, test = [torch.randn(512, 32)], torch.randn(256, 32)
    model = copy.deepcopy(dense)
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform", config=_all_layers())
    apply(model, p, calib, permute=True)
    assert p.permutation is not None

    def err(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(test) - dense(test)).square().mean() / dense(test).square().mean())

    before = err(model)
    unaligned = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="align_to_permuted"):
        restore_model(unaligned, dense, calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # aligned: the kept weights match, no warning
        restore_model(model, mp.align_to_permuted(dense, p), calib)
    assert err(model) < 0.8 * before  # restored in the right basis
    assert all(check_nm(model.get_submodule(n).weight, 2, 4) for n in ("0", "2", "4"))


@pytest.mark.parametrize("solver", ["direct", "obs", "cg"])
def test_a_kept_weight_on_a_dead_input_keeps_its_value(solver: str) -> None:
    """README deviation from §7: damping holds a kept weight whose input is always zero at its given value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8))
    dense = model[0].weight.detach().clone()
    p = mp.plan(model, sparsity=0.5, pattern="unstructured", budget="uniform", config=_all_layers())
    x = torch.randn(256, 32)
    x[:, :8] = 0
    apply(model, p, calibration=x, restore=RestoreConfig(solver=solver), method="magnitude")
    w = model[0].weight.detach()[:, :8]
    kept = w != 0
    assert bool(kept.any())
    torch.testing.assert_close(w[kept], dense[:, :8][kept], rtol=1e-4, atol=1e-6)


def test_low_precision_restore_is_judged_as_stored_and_keeps_the_mask() -> None:
    """bf16 rounding can undo a small gain: the stored weights are never worse than given; a kept fp16 weight that
    would round to zero keeps its given value (the mask is unchanged)."""
    from mp_plugin.restore import LayerGram, restore_layer
    from mp_plugin.restore.solve import output_energy

    g = torch.Generator().manual_seed(2411)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    x = x.to(torch.bfloat16).double()
    h0 = (x.T @ x)[None]
    dense = torch.randn(1, 4, generator=g).to(torch.bfloat16)
    given = dense * torch.tensor([[True, True, True, False]])

    def err(t: torch.Tensor) -> float:
        return output_energy(t.double() - dense.double(), h0[0]) / output_energy(dense.double(), h0[0])

    for solver in ("direct", "obs", "cg"):
        w = given.clone()
        rec = restore_layer(w, dense, LayerGram(h0, 200), RestoreConfig(solver=solver))
        assert err(w) <= err(given) + 1e-12, solver
        assert rec["rel_error_after"] == pytest.approx(err(w), rel=1e-9, abs=1e-15)
    u = 2.0**-24  # float16's smallest subnormal
    x1 = torch.randn(100, 1, generator=g, dtype=torch.float64)
    x = torch.cat([x1, x1, torch.randn(100, 2, generator=g, dtype=torch.float64)], 1)
    dense = torch.tensor([[2 * u, -2 * u, 0.5, 0.0]]).half()
    w = dense * torch.tensor([[True, False, True, False]])
    kept = w != 0
    restore_layer(w, dense, LayerGram((x.T @ x)[None], 100), RestoreConfig(solver="direct"))
    assert torch.equal(w != 0, kept)


def test_a_float64_layer_with_huge_inputs_gets_a_finite_gram() -> None:
    from mp_plugin.restore import capture_grams

    model = nn.Sequential(nn.Linear(4, 2)).double()
    x = torch.randn(16, 4, dtype=torch.float64) * 1e20  # its square overflows float32
    gram = capture_grams(model, ["0"], x)["0"]
    assert bool(torch.isfinite(gram.gram).all())
    torch.testing.assert_close(gram.gram[0], x.T @ x, rtol=1e-12, atol=0)
