"""torchao 0.18 (real, no mocks): sparsify_ and quantize_ with MPSparsifier; torch.ao.pruning sparsifier."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.masks.select import check_nm

torchao = pytest.importorskip("torchao")
timm = pytest.importorskip("timm")
from mp_plugin.integrations.torch_ao_pruner import MPPruningSparsifier  # noqa: E402
from mp_plugin.integrations.torchao import MPSparsifier  # noqa: E402
from torchao.sparsity import sparsify_  # noqa: E402

LINEAR_ONLY = mp.PlanConfig(selection=mp.LayerSelection(include_conv=False))


@pytest.fixture()
def vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16).eval()


def test_literal_sparsify_line_gives_exact_24_and_plan_budgets(vit: nn.Module) -> None:
    reference = copy.deepcopy(vit)
    model = vit
    torchao.sparsity.sparsify_(model, MPSparsifier(sparsity=0.5, pattern="2:4"))
    ref_plan = mp.plan(reference, 0.5, "2:4", config=LINEAR_ONLY)
    mp.apply(reference, ref_plan)
    report = mp.sparsity_report(model, ref_plan)
    assert report.kn_valid and len(report.layers) == len(ref_plan.layers) == 48
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name  # the same pruned model as mp_plugin.plan + apply
    assert torch.count_nonzero(model.head.weight) == model.head.weight.numel()  # head: left dense


def test_budgets_match_plan_for_unstructured_seb(vit: nn.Module) -> None:
    cfg = MPSparsifier(sparsity=0.6, pattern="unstructured", budget="seb")
    ref = mp.plan(copy.deepcopy(vit), 0.6, "unstructured", "seb", config=LINEAR_ONLY)
    sparsify_(vit, cfg)
    got = cfg.plan_for(vit)
    assert [lp.n_prune for lp in got.layers] == [lp.n_prune for lp in ref.layers]
    assert [lp.w for lp in got.layers] == [lp.w for lp in ref.layers]
    assert len({round(lp.w, 3) for lp in got.layers}) > 1  # real per-layer budgets, not one rate
    for lp in got.layers:
        w = dict(vit.named_modules())[lp.name].weight
        assert int((w == 0).sum()) == lp.n_prune


def test_quantize_route_and_filter_fn(vit: nn.Module) -> None:
    def only_mlp(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and ".mlp." in fqn

    cfg = MPSparsifier(sparsity=0.5, pattern="2:4")
    torchao.quantize_(vit, cfg, filter_fn=only_mlp)
    names = [lp.name for lp in cfg.plan_for(vit).layers]
    assert names and all(".mlp." in n for n in names)
    assert torch.count_nonzero(vit.blocks[0].attn.qkv.weight) == vit.blocks[0].attn.qkv.weight.numel()
    assert mp.sparsity_report(vit, cfg.plan_for(vit)).kn_valid


def test_calling_twice_is_idempotent(vit: nn.Module) -> None:
    sparsify_(vit, MPSparsifier(sparsity=0.5, pattern="2:4"))
    once = copy.deepcopy(vit.state_dict())
    sparsify_(vit, MPSparsifier(sparsity=0.5, pattern="2:4"))
    for k, v in vit.state_dict().items():
        assert torch.equal(v, once[k]), k


def test_non_divisible_layers_stay_dense_and_are_reported() -> None:
    model = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 8))
    cfg = MPSparsifier(
        sparsity=0.5, pattern="2:4", plan_config=mp.PlanConfig(selection=mp.LayerSelection(exclude_head=False))
    )
    sparsify_(model, cfg)
    lp = cfg.plan_for(model).layer("2")
    assert lp.pattern == "dense" and "not divisible by 4" in lp.note
    assert torch.count_nonzero(model[2].weight) == model[2].weight.numel()
    assert mp.sparsity_report(model, cfg.plan_for(model)).kn_valid


def test_model_converted_by_another_tool_is_refused() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))

    class Wrapped(torch.Tensor):
        pass

    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(Wrapped))
    with pytest.raises(mp.MPPluginError, match="already converted"):
        sparsify_(model, MPSparsifier())


def test_cast_needs_calibration(vit: nn.Module) -> None:
    with pytest.raises(mp.MPPluginError, match="calibration"):
        sparsify_(vit, MPSparsifier(projection="cast"))


def test_cast_with_calibration_runs(vit: nn.Module) -> None:
    batch = torch.randn(2, 3, 64, 64)
    cfg = MPSparsifier(sparsity=0.5, pattern="2:4", projection="cast", calibration=batch)
    sparsify_(vit, cfg)
    assert mp.sparsity_report(vit, cfg.plan_for(vit)).kn_valid
    assert cfg.plan_for(vit).applied["method"] == "cast"


def test_old_method_cast_means_seb_budget_and_cast_projection() -> None:
    with pytest.warns(DeprecationWarning, match="budget="):
        cfg = MPSparsifier(method="cast")
    assert (cfg.budget, cfg.projection) == ("seb", "cast")
    with pytest.warns(DeprecationWarning):
        assert MPSparsifier(method="seb-hill").budget == "seb-hill"


def test_lazy_top_level_import() -> None:
    assert mp.MPSparsifier is MPSparsifier


def test_accelerate_on_cpu_stays_dense_with_zeros(vit: nn.Module) -> None:
    sparsify_(vit, MPSparsifier(sparsity=0.5, pattern="2:4", accelerate=True))
    assert type(vit.blocks[0].mlp.fc1.weight) is nn.Parameter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse tensors need CUDA")
def test_accelerate_on_cuda_uses_semi_structured() -> None:
    from torch.sparse import SparseSemiStructuredTensor

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).half().cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.half)
    sparsify_(model, MPSparsifier(sparsity=0.5, pattern="2:4"))
    dense_out = model(x)
    sparsify_(model, MPSparsifier(sparsity=0.5, pattern="2:4", accelerate=True))
    assert isinstance(model.blocks[0].mlp.fc1.weight, SparseSemiStructuredTensor)
    torch.testing.assert_close(model(x), dense_out, rtol=1e-2, atol=1e-2)


def test_torch_ao_pruning_sparsifier_holds_masks_through_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    sel = mp.PlanConfig(selection=mp.LayerSelection(exclude_head=False))
    sparsifier = MPPruningSparsifier(sparsity=0.5, pattern="2:4", plan_config=sel)
    sparsifier.prepare(model, config=None)
    assert sparsifier.plan is not None and len(sparsifier.plan.layers) == 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for m in (model[0], model[2], model[4]):
            assert check_nm(m.weight, 2, 4)  # masked forward weight stays 2:4
    sparsifier.step()
    sparsifier.squash_mask()
    assert not torch.nn.utils.parametrize.is_parametrized(model[0])
    report = mp.sparsity_report(model, sparsifier.plan)
    assert report.kn_valid and report.total_sparsity == pytest.approx(0.5)


def _ao_masks(model: nn.Module) -> dict[int, torch.Tensor]:
    return {i: model[i].parametrizations.weight[0].mask.detach().clone() for i in (0, 2, 4)}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_torch_ao_pruning_masks_stay_fixed_unless_reselection_is_asked_for(pattern: str) -> None:
    """Real SGD steps with torch.ao's step() after each: MP's masks stay put; reselect=True re-chooses them."""
    moved = {}
    for reselect in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        sel = mp.PlanConfig(selection=mp.LayerSelection(exclude_head=False))
        sparsifier = MPPruningSparsifier(sparsity=0.5, pattern=pattern, plan_config=sel, reselect=reselect)
        sparsifier.prepare(model, config=None)
        chosen = _ao_masks(model)
        for i, name in ((0, "0"), (2, "2"), (4, "4")):  # torch.ao holds exactly the keeper's masks
            assert torch.equal(chosen[i].bool(), sparsifier.keeper.masks[name])
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
        for _ in range(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sparsifier.step()
        after = _ao_masks(model)
        moved[reselect] = sum(int((after[i] != chosen[i]).sum()) for i in after)
        if pattern == "2:4":
            assert all(check_nm(model[i].weight, 2, 4) for i in (0, 2, 4))
        sparsifier.squash_mask()
        report = mp.sparsity_report(model, sparsifier.plan)
        assert report.total_sparsity == pytest.approx(0.5)
    assert moved[False] == 0
    assert moved[True] > 0


def test_torch_ao_pruning_unstructured_counts_and_bad_config() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    sparsifier = MPPruningSparsifier(sparsity=0.7, pattern="unstructured", budget="seb")
    sparsifier.prepare(model, config=None)
    sparsifier.squash_mask()
    assert [lp.name for lp in sparsifier.plan.layers] == ["0", "2", "4"]
    assert [int((model[i].weight == 0).sum()) for i in (0, 2, 4)] == [lp.n_prune for lp in sparsifier.plan.layers]
    with pytest.raises(mp.MPPluginError, match="not a planned target"):
        MPPruningSparsifier().prepare(model, config=[{"tensor_fqn": "1.weight"}])


def test_restore_through_sparsify_matches_the_core_route_and_beats_masking(vit: nn.Module) -> None:
    """``MPSparsifier(restore=True)`` is ``mp.apply(restore=True)``, and restore brings the output closer to dense."""
    calib = [torch.randn(4, 3, 64, 64) for _ in range(3)]
    test = torch.randn(4, 3, 64, 64)
    dense = copy.deepcopy(vit)
    masked, core = copy.deepcopy(vit), copy.deepcopy(vit)
    sparsify_(masked, MPSparsifier(sparsity=0.5, pattern="2:4", calibration=calib))
    cfg = MPSparsifier(sparsity=0.5, pattern="2:4", calibration=calib, projection="cast-obs", restore=True)
    sparsify_(vit, cfg)
    p = cfg.plan_for(vit)
    assert mp.sparsity_report(vit, p).kn_valid and p.applied["restore"]["damp"] == 0.01
    ref_plan = mp.plan(core, 0.5, "2:4", config=LINEAR_ONLY)
    mp.apply(core, ref_plan, calibration=calib, projection="cast-obs", restore=True)
    for (name, a), b in zip(vit.named_parameters(), core.parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        ref = dense(test)
        assert (vit(test) - ref).square().mean() < (masked(test) - ref).square().mean()
    with pytest.raises(mp.MPPluginError, match="calibration"):
        sparsify_(copy.deepcopy(dense), MPSparsifier(restore=True))
