"""torchao 0.18 (real, no mocks): sparsify_, quantize_ and FqnToConfig with MPSparsifier; torch.ao.pruning sparsifier."""

from __future__ import annotations

import copy
import inspect
import json
import sys
import warnings

import pytest
import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.budget.rules import DEFAULT_BUDGET, DEFAULT_RESTORE_BUDGET
from mp_plugin.masks.select import check_nm

torchao = pytest.importorskip("torchao")
timm = pytest.importorskip("timm")
from mp_plugin.integrations.torch_ao_pruner import MPPruningSparsifier  # noqa: E402
from mp_plugin.integrations.torchao import MPSparsifier, convert_module  # noqa: E402
from mp_plugin.integrations.torchao_targets import filter_matches, fqn_matches, reached_layers  # noqa: E402
from torchao.core.config import AOBaseConfig  # noqa: E402
from torchao.quantization.transform_module import register_quantize_module_handler  # noqa: E402
from torchao.sparsity import sparsify_  # noqa: E402

LINEAR_ONLY = mp.PlanConfig(selection=mp.LayerSelection(include_conv=False))


@pytest.fixture()
def vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16).eval()


def same_params(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of parameters that differ between ``a`` and ``b`` (those under ``skip`` not checked)."""
    other = dict(b.named_parameters())
    return [n for n, p in a.named_parameters() if not n.startswith(skip) and not torch.equal(p, other[n])]


class Recorder(AOBaseConfig):
    """A real torchao config whose handler records what torchao hands it (no pruning)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []


@register_quantize_module_handler(Recorder)
def _record(module: nn.Module, config: Recorder, parameter_name: str | None = None) -> nn.Module:
    config.calls.append((id(module), parameter_name))
    return module


def test_literal_sparsify_line_prunes_every_reached_layer_on_its_own(vit: nn.Module) -> None:
    """The literal line: each Linear torchao hands over gets its own exact 2:4 mask, the head included."""
    reference = copy.deepcopy(vit)
    model = vit
    torchao.sparsity.sparsify_(model, MPSparsifier())
    alone = mp.PlanConfig(selection=mp.LayerSelection(include_conv=False, exclude_head=False))
    ref_plan = mp.plan(reference, 0.5, "2:4", config=alone)
    mp.apply(reference, ref_plan)
    assert not same_params(model, reference)  # the same pruned model as mp_plugin.plan + apply per layer
    got = MPSparsifier().plan_for(model)
    assert [lp.name for lp in got.layers] == [lp.name for lp in ref_plan.layers] and len(got.layers) == 49
    assert mp.sparsity_report(model, got).kn_valid and check_nm(model.head.weight, 2, 4)


def test_for_model_plans_once_for_the_whole_model_and_matches_the_core_route(vit: nn.Module) -> None:
    reference, before = copy.deepcopy(vit), copy.deepcopy(vit)
    cfg = MPSparsifier.for_model(vit, sparsity=0.5, pattern="2:4")
    assert not same_params(vit, before)  # magnitude settings: planning changes nothing
    assert isinstance(cfg.plan, dict) and len(cfg.plan["layers"]) == 48
    sparsify_(vit, cfg)
    ref_plan = mp.plan(reference, 0.5, "2:4", config=LINEAR_ONLY)
    mp.apply(reference, ref_plan)
    assert not same_params(vit, reference)
    assert torch.count_nonzero(vit.head.weight) == vit.head.weight.numel()  # head: left dense by the plan
    assert mp.sparsity_report(vit, cfg.plan_for(vit)).kn_valid


def test_budgets_match_plan_for_unstructured_seb(vit: nn.Module) -> None:
    cfg = MPSparsifier.for_model(vit, sparsity=0.6, pattern="unstructured", budget="seb")
    ref = mp.plan(copy.deepcopy(vit), 0.6, "unstructured", "seb", config=LINEAR_ONLY)
    sparsify_(vit, cfg)
    got = cfg.plan_for(vit)
    assert [lp.n_prune for lp in got.layers] == [lp.n_prune for lp in ref.layers]
    assert [lp.w for lp in got.layers] == [lp.w for lp in ref.layers]
    assert len({round(lp.w, 3) for lp in got.layers}) > 1  # real per-layer budgets, not one rate
    for lp in got.layers:
        w = dict(vit.named_modules())[lp.name].weight
        assert int((w == 0).sum()) == lp.n_prune
        assert got.applied["layers"][lp.name]["method"] == "magnitude"


def test_whole_model_settings_without_a_plan_are_refused_before_any_change(vit: nn.Module) -> None:
    before = copy.deepcopy(vit)
    for cfg in (
        MPSparsifier(pattern="unstructured", budget="seb"),
        MPSparsifier(pattern="auto"),
        MPSparsifier(permute="swap"),
        # layer names: torchao hands over each module without its name
        MPSparsifier(plan_config=mp.PlanConfig(selection=mp.LayerSelection(exclude=["fc2"]))),
        MPSparsifier(plan_config=mp.PlanConfig(selection=mp.LayerSelection(include_only=["qkv"]))),
    ):
        with pytest.raises(mp.MPPluginError, match="for_model"):
            sparsify_(vit, cfg)
        assert not same_params(vit, before)


def test_quantize_route_and_filter_fn(vit: nn.Module) -> None:
    def only_mlp(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and ".mlp." in fqn

    planned_model = copy.deepcopy(vit)
    cfg = MPSparsifier(sparsity=0.5, pattern="2:4")
    torchao.quantize_(vit, cfg, filter_fn=only_mlp)
    names = [lp.name for lp in cfg.plan_for(vit).layers]
    assert len(names) == 24 and all(".mlp." in n for n in names)
    assert torch.count_nonzero(vit.blocks[0].attn.qkv.weight) == vit.blocks[0].attn.qkv.weight.numel()
    assert mp.sparsity_report(vit, cfg.plan_for(vit)).kn_valid
    planned = MPSparsifier.for_model(planned_model, filter_fn=only_mlp, pattern="unstructured", budget="seb")
    assert [lp["name"] for lp in planned.plan["layers"]] == names
    torchao.quantize_(planned_model, planned, filter_fn=only_mlp)
    assert [int((dict(planned_model.named_modules())[n].weight == 0).sum()) for n in names] == [
        lp["n_prune"] for lp in planned.plan["layers"]
    ]


def test_filter_is_evaluated_the_way_torchao_evaluates_it(vit: nn.Module) -> None:
    """A filter that accepts a block hands the block over whole; its children are not visited again."""
    wanted = {"blocks.1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"}

    def pick(module: nn.Module, fqn: str) -> bool:
        return fqn in wanted

    recorder = Recorder()
    sparsify_(vit, recorder, filter_fn=pick)
    by_id = {id(m): n for n, m in vit.named_modules()}
    assert (
        [by_id[i] for i, _ in recorder.calls]
        == [n for n, _ in filter_matches(vit, pick)]
        == ["blocks.1", "blocks.2.mlp.fc1"]
    )
    inside = [f"blocks.1.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + ["blocks.2.mlp.fc1"]
    assert reached_layers(vit, pick) == ["blocks.1"] + [
        n for n, _ in vit.blocks[1].named_modules(prefix="blocks.1") if n != "blocks.1"
    ] + ["blocks.2.mlp.fc1"]
    before = copy.deepcopy(vit)
    cfg = MPSparsifier()
    sparsify_(vit, cfg, filter_fn=pick)
    assert sorted(lp.name for lp in cfg.plan_for(vit).layers) == sorted(inside)
    changed = {n.rsplit(".", 1)[0] for n in same_params(vit, before)}
    assert changed == set(inside)
    planned = MPSparsifier.for_model(before, filter_fn=pick, pattern="unstructured")
    assert sorted(lp["name"] for lp in planned.plan["layers"]) == sorted(inside)


@pytest.mark.parametrize(
    "keys",
    [
        ["blocks.0.mlp.fc1"],
        ["blocks.1.attn.qkv.weight", "blocks.2.mlp.fc2.bias"],
        ["re:blocks\\.[01]\\.mlp\\..*", "blocks.0.mlp.fc2.bias"],
        ["re:.*fc2.weight", "_default"],
    ],
)
def test_fqn_to_config_prunes_only_what_it_names(vit: nn.Module, keys: list[str]) -> None:
    from torchao.quantization import FqnToConfig

    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao: "_default is deprecated"
        torchao.quantize_(vit, FqnToConfig(dict.fromkeys(keys, recorder)), filter_fn=None)
        by_id = {id(m): n for n, m in vit.named_modules()}
        seen = {(by_id[i], "weight" if p is None else p) for i, p in recorder.calls}
        predicted = {(n, "weight") for n, _, what in fqn_matches(vit, keys, lambda c: True)}
        assert {s for s in seen if s[1] == "weight"} == predicted  # what torchao really hands over
        named = sorted(n for n, _ in predicted if isinstance(vit.get_submodule(n), nn.Linear))
        for planned in (False, True):
            model = copy.deepcopy(vit)
            if planned:
                cfg = MPSparsifier.for_model(model, fqn_to_config=keys, pattern="unstructured", budget="seb")
                assert sorted(lp["name"] for lp in cfg.plan["layers"]) == [n for n in named if n != "head"]
            else:
                cfg = MPSparsifier()
            torchao.quantize_(model, FqnToConfig(dict.fromkeys(keys, cfg)), filter_fn=None)
            changed = sorted({n.rsplit(".", 1)[0] for n in same_params(model, vit)})
            assert changed == [n for n in named if not (planned and n == "head")], (planned, changed)
            assert not any(n.endswith("bias") for n in same_params(model, vit))


def test_config_round_trips_through_torchao_serialisation(vit: nn.Module) -> None:
    from torchao.core.config import config_from_dict, config_to_dict

    twin = copy.deepcopy(vit)
    restore_cfg = mp.RestoreConfig(damp=0.05)
    literal = MPSparsifier(sparsity=0.5, plan_config=LINEAR_ONLY, restore=restore_cfg, accelerate=True)
    planned = MPSparsifier.for_model(vit, sparsity=0.6, pattern="unstructured", budget="seb")
    for cfg in (literal, planned):
        data = json.loads(json.dumps(config_to_dict(cfg)))  # really through JSON text
        back = config_from_dict(data)
        assert type(back) is MPSparsifier and back == cfg
    assert literal.restore == restore_cfg.to_dict() and literal.plan_config == LINEAR_ONLY.to_dict()
    back = config_from_dict(json.loads(json.dumps(config_to_dict(planned))))
    with pytest.raises(mp.PlanMismatchError, match="bind"):
        sparsify_(twin, back)  # a copy of the model: not the bound one
    sparsify_(twin, back.bind(twin))
    sparsify_(vit, planned)
    assert not same_params(vit, twin)
    with pytest.raises(mp.ConfigError, match="for_model"):
        MPSparsifier(calibration=torch.randn(2, 3, 64, 64))


def test_plan_for_a_different_model_leaves_it_unchanged() -> None:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    other = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    before = copy.deepcopy(other)
    sel = mp.PlanConfig(selection=mp.LayerSelection(exclude_head=False))
    cfg = MPSparsifier.for_model(small, pattern="unstructured", budget="seb", plan_config=sel)
    with pytest.raises(mp.PlanMismatchError, match="plan expects weight"):
        MPSparsifier(plan=cfg.plan).bind(other)
    with pytest.raises(mp.PlanMismatchError):
        sparsify_(other, cfg)
    assert not same_params(other, before)


def test_a_failure_midway_puts_back_the_modules_already_pruned(vit: nn.Module) -> None:
    """Planned, then one later layer's weight no longer matches: torchao has pruned blocks 0–5 by then."""
    cfg = MPSparsifier.for_model(vit, sparsity=0.6, pattern="unstructured", budget="seb")
    original = vit.blocks[6].mlp.fc1.weight
    vit.blocks[6].mlp.fc1.weight = nn.Parameter(torch.randn(768, 96))
    before = copy.deepcopy(vit)
    with pytest.raises(mp.PlanMismatchError, match="blocks.6.mlp.fc1"):
        sparsify_(vit, cfg)
    assert not same_params(vit, before)  # blocks 0–5 are dense again
    assert cfg.plan_for(vit).applied.get("layers", {}) == {}
    vit.blocks[6].mlp.fc1.weight = original
    sparsify_(vit, cfg)  # fixed: the same binding now applies every layer
    assert all(
        int((dict(vit.named_modules())[lp["name"]].weight == 0).sum()) == lp["n_prune"] for lp in cfg.plan["layers"]
    )


def test_device_argument_and_a_direct_handler_call(vit: nn.Module) -> None:
    """``device=`` moves modules one by one; planning happened before, each module is pruned where it is."""
    plain, moved = copy.deepcopy(vit), copy.deepcopy(vit)
    cfg = MPSparsifier.for_model(plain, pattern="unstructured", budget="seb")
    cfg_moved = MPSparsifier(plan=cfg.plan).bind(moved)
    sparsify_(plain, cfg)
    torchao.quantize_(moved, cfg_moved, device="cpu")
    assert not same_params(moved, plain)
    direct = MPSparsifier(plan=cfg.plan).bind(vit)
    convert_module(vit.blocks[0].mlp.fc1, direct)  # no torchao frame on the stack: still works
    assert torch.equal(vit.blocks[0].mlp.fc1.weight, plain.blocks[0].mlp.fc1.weight)
    source = inspect.getsource(sys.modules[MPSparsifier.__module__])
    assert "_is_linear" not in source and "currentframe" not in source and "f_locals" not in source


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda_prunes_a_model_moved_module_by_module(vit: nn.Module) -> None:
    cpu_copy, on_gpu = copy.deepcopy(vit), copy.deepcopy(vit)
    cfg = MPSparsifier.for_model(cpu_copy, pattern="unstructured", budget="seb")
    sparsify_(cpu_copy, cfg)
    gpu_cfg = MPSparsifier.for_model(on_gpu, pattern="unstructured", budget="seb")
    torchao.quantize_(on_gpu, gpu_cfg, device="cuda")
    assert all(p.is_cuda for p in on_gpu.parameters())
    zeros = {n: (p == 0) for n, p in cpu_copy.named_parameters()}
    for n, p in on_gpu.named_parameters():
        assert torch.equal((p == 0).cpu(), zeros[n]), n
    literal = copy.deepcopy(vit)
    torchao.quantize_(literal, MPSparsifier(), device="cuda")
    assert mp.sparsity_report(literal, MPSparsifier().plan_for(literal)).kn_valid


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
    with pytest.raises(mp.MPPluginError, match="already converted"):
        MPSparsifier.for_model(model)


def test_cast_needs_calibration(vit: nn.Module) -> None:
    with pytest.raises(mp.MPPluginError, match="calibration"):
        sparsify_(vit, MPSparsifier(projection="cast"))
    with pytest.raises(mp.MPPluginError, match="calibration"):
        MPSparsifier.for_model(vit, projection="cast")


def test_cast_with_calibration_runs(vit: nn.Module) -> None:
    batch = torch.randn(2, 3, 64, 64)
    fresh, core = copy.deepcopy(vit), copy.deepcopy(vit)
    cfg = MPSparsifier.for_model(vit, sparsity=0.5, pattern="2:4", projection="cast", calibration=batch)
    sparsify_(vit, cfg)
    assert mp.sparsity_report(vit, cfg.plan_for(vit)).kn_valid
    assert cfg.plan_for(vit).applied["method"] == "cast"
    mp.apply(core, mp.plan(core, 0.5, "2:4", config=LINEAR_ONLY), calibration=batch, projection="cast")
    assert not same_params(vit, core)
    untouched = copy.deepcopy(fresh)
    with pytest.raises(mp.MPPluginError, match="not pruned yet"):
        sparsify_(fresh, MPSparsifier(**{**cfg.__dict__}).bind(fresh))  # cast masks need the calibration data
    assert not same_params(fresh, untouched)


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
    sparsify_(masked, MPSparsifier.for_model(masked, sparsity=0.5, pattern="2:4", calibration=calib))
    cfg = MPSparsifier.for_model(vit, sparsity=0.5, pattern="2:4", calibration=calib, restore=True)
    sparsify_(vit, cfg)
    p = cfg.plan_for(vit)
    assert mp.sparsity_report(vit, p).kn_valid and p.applied["restore"]["damp"] == 0.01
    # the projection defaults like apply's: cast-obs with restore, magnitude without
    assert cfg.projection == p.applied["method"] == "cast-obs" and MPSparsifier().projection == "magnitude"
    assert cfg.budget == p.method == DEFAULT_RESTORE_BUDGET and MPSparsifier().budget == DEFAULT_BUDGET
    ref_plan = mp.plan(core, 0.5, "2:4", config=LINEAR_ONLY)
    mp.apply(core, ref_plan, calibration=calib, restore=True)
    for (name, a), b in zip(vit.named_parameters(), core.parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        ref = dense(test)
        assert (vit(test) - ref).square().mean() < (masked(test) - ref).square().mean()
    with pytest.raises(mp.MPPluginError, match="calibration"):
        sparsify_(copy.deepcopy(dense), MPSparsifier(restore=True))
    with pytest.raises(mp.MPPluginError, match="calibration"):
        MPSparsifier.for_model(copy.deepcopy(dense), restore=True)


# ------------------------------------------------------------------ an audit's findings


def _mlp3() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def test_a_module_replaced_after_planning_fails_and_leaves_the_model_as_it_was() -> None:
    model = _mlp3()
    cfg = MPSparsifier.for_model(model, pattern="unstructured", plan_config=mp.PlanConfig(
        selection=mp.LayerSelection(exclude_head=False)))  # fmt: skip
    model[4] = nn.Linear(64, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp.MPPluginError):
        sparsify_(model, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fqn_to_config_counts_every_config_a_weight_receives() -> None:
    from torchao.quantization import FqnToConfig

    class Other(AOBaseConfig):
        pass

    model = _mlp3()
    hit = fqn_matches(
        model, {"0.weight": MPSparsifier(), "re:.*weight": Other()}, lambda c: isinstance(c, MPSparsifier)
    )
    assert [fqn for fqn, _, _ in hit] == ["0"]  # the exact key and a regex both call the handler for 0.weight
    hit = fqn_matches(
        model, {"re:.*weight": MPSparsifier(), r"re:2\.weight": Other()}, lambda c: isinstance(c, MPSparsifier)
    )
    assert [fqn for fqn, _, _ in hit] == ["0", "2", "4"]
    assert FqnToConfig is not None


def test_a_parameter_key_prunes_only_that_modules_own_weight() -> None:
    from torchao.quantization import FqnToConfig

    class Blk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64))
            self.proj = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x * self.weight)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), Blk(), nn.Linear(64, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao.quantize_(model, FqnToConfig({"1.weight": MPSparsifier()}), filter_fn=None)
    assert int((model[1].proj.weight == 0).sum()) == 0 and int((model[0].weight == 0).sum()) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"sparsity": 1.5}, {"sparsity": "0.5"}, {"pattern": "3:2"}, {"budget": "nope"}, {"permute": "bogus"},
     {"accelerate": "yes"}, {"plan_config": 5}],
)  # fmt: skip
def test_bad_settings_are_refused_when_the_config_is_made(kwargs: dict) -> None:
    with pytest.raises(mp.MPPluginError):
        MPSparsifier(**kwargs)
