"""ModelOpt 0.47 (real, no mocks): mode "mp", plans in ModelOpt's metadata, save/restore in a fresh process,
ModelOpt's size check, permutation, export, KD chaining."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.budget.rules import DEFAULT_BUDGET, DEFAULT_RESTORE_BUDGET
from mp_plugin.masks.select import check_nm, nm_mask
from mp_plugin.permute import PermutationRecord, align_to_permuted

mts = pytest.importorskip("modelopt.torch.sparsity")
mto = pytest.importorskip("modelopt.torch.opt")
mtd = pytest.importorskip("modelopt.torch.distill")
timm = pytest.importorskip("timm")
mpm = importlib.import_module("mp_plugin.integrations.modelopt")


def _vit(seed: int, depth: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth).eval()


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m._weight_mask.clone() for n, m in model.named_modules() if getattr(m, "_weight_mask", None) is not None}


def test_registration_is_idempotent() -> None:
    from modelopt.torch.sparsity.weight_sparsity.mode import SparsityModeRegistry

    first = SparsityModeRegistry["mp"]
    importlib.reload(mpm)
    importlib.reload(mpm)
    mpm.register()
    mpm.register()
    assert SparsityModeRegistry["mp"] is first  # registered once, not replaced
    model = mts.sparsify(_vit(0, depth=2), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    assert mpm.plan_of(model).pattern == "2:4"  # the reloaded module still reads the plans


@pytest.mark.parametrize(("pattern", "k", "n"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_mp_mode_kn_matches_plan(pattern: str, k: int, n: int) -> None:
    model = mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.5, "pattern": pattern})
    reference = mp.plan(_vit(0), 0.5, pattern)
    got = mpm.plan_of(model)
    assert [lp.name for lp in got.layers] == [lp.name for lp in reference.layers]
    assert [lp.w for lp in got.layers] == [lp.w for lp in reference.layers]
    fc1 = model.blocks[0].mlp.fc1
    assert check_nm(fc1.weight, k, n)  # the masked forward weight
    assert fc1._weight_mask.float().mean().item() == pytest.approx(k / n)


def test_mp_mode_unstructured_with_modelopt_pattern_spelling() -> None:
    model = mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.7, "pattern": "unstructured", "budget": "seb"})
    p = mpm.plan_of(model)
    zeros = sum(int((dict(model.named_modules())[lp.name].weight == 0).sum()) for lp in p.layers)
    assert zeros == sum(lp.n_prune for lp in p.layers)
    model2 = mts.sparsify(_vit(0), mode="mp", config={"pattern": "2:4 sparsity"})
    assert mpm.plan_of(model2).pattern == "2:4"
    assert not hasattr(model, "_mp_plan") and not hasattr(model2, "_mp_plan")  # nothing stuck on the user's model


def test_plan_config_may_be_a_dict_and_the_projection_defaults_like_apply() -> None:
    cfg = mp.PlanConfig(beta=0.7)
    model = mts.sparsify(
        _vit(0), mode="mp", config={"sparsity": 0.6, "pattern": "unstructured", "plan_config": cfg.to_dict()}
    )
    p = mpm.plan_of(model)
    assert p.config.beta == 0.7 and p.applied["method"] == "magnitude"  # no restore: magnitude, as mp.apply


def test_two_models_get_their_own_plans_one_after_another_and_concurrently() -> None:
    configs = [{"sparsity": 0.5, "pattern": "2:4"}, {"sparsity": 0.7, "pattern": "unstructured", "budget": "seb"}]
    first = mts.sparsify(_vit(0, depth=2), mode="mp", config=configs[0])
    second = mts.sparsify(_vit(1, depth=2), mode="mp", config=configs[1])
    a, b = mpm.plan_of(first), mpm.plan_of(second)
    assert (a.pattern, a.sparsity, b.pattern, b.sparsity) == ("2:4", 0.5, "unstructured", 0.7)
    assert a.to_dict() != b.to_dict()
    assert not hasattr(mpm.MPSearcher, "plan")  # no class-level plan shared between searches

    results: dict[int, nn.Module] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = mts.sparsify(_vit(i, depth=2), mode="mp", config=configs[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, expected in ((0, a), (1, b)):
        got = mpm.plan_of(results[i])
        assert (got.pattern, got.sparsity) == (expected.pattern, expected.sparsity)
        zeros = sum(int((dict(results[i].named_modules())[lp.name].weight == 0).sum()) for lp in got.layers)
        assert zeros == sum(lp.n_prune for lp in got.layers)  # each model's masks follow its own plan


def test_plan_of_through_wrappers_and_on_unconverted_models() -> None:
    model = mts.sparsify(_vit(0, depth=2), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    expected = mpm.plan_of(model).to_dict()
    assert mpm.plan_of(nn.DataParallel(model)).to_dict() == expected
    assert mpm.plan_of(torch.compile(model)).to_dict() == expected  # wrapping only: nothing is compiled
    with pytest.raises(mp.MPPluginError, match="no ModelOpt state"):
        mpm.plan_of(_vit(0, depth=2))
    magnitude = mts.sparsify(_vit(0, depth=2), mode="sparse_magnitude")
    with pytest.raises(mp.MPPluginError, match="no 'mp' mode"):
        mpm.plan_of(magnitude)


def test_modelopt_size_check_runs_and_skips_layers_the_pattern_does_not_fit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mts.sparsify(model, mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    assert any("Skipping sparsifying 0 " in str(w.message) for w in caught)
    assert torch.equal(model[0].weight.detach(), before)  # 10 input channels: no 2:4, left dense …
    assert bool(model[0]._weight_mask.all())  # … with ModelOpt's own all-ones mask
    assert check_nm(model[2].weight, 2, 4)
    assert "0" not in [lp.name for lp in mpm.plan_of(model).layers]
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mts.sparsify(other, mode="mp", config={"sparsity": 0.5, "pattern": "unstructured"})
    assert not any("Skipping" in str(w.message) for w in caught)  # unstructured fits every shape


def test_failed_search_gives_modelopt_its_masks_back() -> None:
    model = _vit(0, depth=2)
    with pytest.raises(mp.MPPluginError, match="calibration"):
        mts.sparsify(model, mode="mp", config={"sparsity": 0.5, "pattern": "2:4", "projection": "cast"})
    sparse = [m for m in model.modules() if isinstance(m, mpm.SparseModule)]
    assert sparse and all(m._weight_mask is not None and bool(m._weight_mask.all()) for m in sparse)


def test_permute_option_folds_a_permutation_before_the_masks() -> None:
    x = torch.randn(4, 3, 32, 32)
    dense = _vit(0, depth=2)
    plain = mts.sparsify(_vit(0, depth=2), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    permuted = mts.sparsify(
        _vit(0, depth=2), mode="mp", config={"sparsity": 0.5, "pattern": "2:4", "permute": "swap", "calibration": x}
    )
    the_plan = mpm.plan_of(permuted)
    assert the_plan.applied["permute"] == "swap"
    perms = PermutationRecord.from_plan(the_plan).permutations
    assert "blocks.0.mlp.fc2" in perms
    for name in perms:
        kept_plain = dict(plain.named_modules())[name].weight.abs().sum()
        module = dict(permuted.named_modules())[name]
        assert check_nm(module.weight, 2, 4)
        assert module.weight.abs().sum() > kept_plain  # the permuted order keeps more magnitude under 2:4
    # the plan's record replays the folds on the dense model: same function, and the masks are the magnitude
    # 2:4 masks of the permuted dense weights, so the permutation was folded in before the masks were chosen
    aligned = align_to_permuted(dense, the_plan)
    with torch.no_grad():
        assert torch.allclose(aligned(x), dense(x), atol=1e-4)
    for name in perms:
        w_dense = aligned.get_submodule(name).weight.detach()
        w_sparse = permuted.get_submodule(name).weight.detach()
        assert torch.equal(w_sparse != 0, nm_mask(w_dense, 2, 4))
        assert torch.equal(w_sparse, w_dense * nm_mask(w_dense, 2, 4))
    with pytest.raises(mp.MPPluginError, match="permutation only helps k:n"):
        mts.sparsify(_vit(0, depth=2), mode="mp", config={"pattern": "unstructured", "permute": True})
    with pytest.raises(mp.MPPluginError, match="permute must be"):
        mts.sparsify(_vit(0, depth=2), mode="mp", config={"pattern": "2:4", "permute": "sideways"})


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(mp.MPPluginError, match="unknown config keys"):
        mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.5, "bogus": 1})


def test_save_restore_in_fresh_process_is_bit_identical_and_keeps_the_plan(tmp_path) -> None:
    """Permuted 2:4 model: save → restore in a fresh process gives the same outputs, and ``plan_of`` there
    returns the same plan (with the permutation record) read from ModelOpt's restored metadata."""
    x = torch.randn(2, 3, 32, 32)
    model = mts.sparsify(
        _vit(0), mode="mp", config={"sparsity": 0.5, "pattern": "2:4", "permute": "swap", "calibration": x}
    )
    y = model(x)
    expected = mpm.plan_of(model).to_dict()
    assert expected["applied"]["permutation"]["permutations"]
    mto.save(model, str(tmp_path / "mp.pth"))
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    (tmp_path / "plan.json").write_text(json.dumps(expected))
    script = textwrap.dedent(
        f"""
        import json, pathlib, torch, timm
        import mp_plugin.integrations.modelopt as mpm
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4).eval()
        model = mpm.restore(model, r"{tmp_path / "mp.pth"}")
        io = torch.load(r"{tmp_path / "io.pt"}")
        assert torch.equal(model(io["x"]), io["y"]), "restored outputs differ"
        expected = json.loads(pathlib.Path(r"{tmp_path / "plan.json"}").read_text())
        assert mpm.plan_of(model).to_dict() == expected, "restored plan differs"
        import modelopt.torch.sparsity as mts
        plain = mts.export(model)
        assert mpm.plan_of(plain).to_dict() == expected, "plan lost by export"
        assert type(plain.blocks[0].mlp.fc1) is torch.nn.Linear
        assert torch.equal(plain(io["x"]), io["y"]), "exported outputs differ"
        print("RESTORE_OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "RESTORE_OK" in out.stdout, out.stderr[-3000:]


def _confident_vit(seed: int) -> nn.Module:
    """A random ViT whose head is scaled up, so its logits are spread and a KD loss is measurable."""
    model = _vit(seed)
    with torch.no_grad():
        model.head.weight.mul_(50.0)
    return model


def test_kd_distillation_keeps_masks_then_exports() -> None:
    teacher = _confident_vit(0)
    student = mts.sparsify(_confident_vit(0), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    masks = _masks(student)
    kd_config = {"teacher_model": teacher, "criterion": mtd.LogitsDistillationLoss(), "loss_balancer": None}
    distill = mtd.convert(student, mode=[("kd_loss", kd_config)])
    opt = torch.optim.AdamW([p for p in distill.parameters() if p.requires_grad], lr=1e-3)
    distill.train()
    x = torch.randn(4, 3, 32, 32)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        distill(x)
        loss = distill.compute_kd_loss()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-4  # the 2:4 student starts away from its teacher …
    assert losses[-1] < losses[0]  # … and distillation brings it closer
    for name, module in distill.named_modules():
        if name in masks:
            assert torch.equal(module._weight_mask, masks[name])
            assert bool((module.weight[~masks[name]] == 0).all())
    assert mpm.plan_of(distill).to_dict() == mpm.plan_of(student).to_dict()  # the plan travels with kd_loss
    plain = mts.export(mtd.export(distill))
    assert type(plain.blocks[0].mlp.fc1) is nn.Linear
    assert mp.sparsity_report(plain, mpm.plan_of(plain)).kn_valid


def test_mp_mode_restore_with_forward_loop_round_trips_bit_exact(tmp_path) -> None:
    """mode "mp" with restore=True, calibration through ModelOpt's forward_loop: the restored values are the
    module's real parameters (masked view = raw weight), closer to dense than masking, and save → restore in a
    fresh process is bit-exact."""
    calib = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    test = torch.randn(8, 3, 32, 32)
    dense = _vit(0)

    def loop(m: nn.Module) -> None:
        for x in calib:
            m(x)

    masked = mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    model = mts.sparsify(
        _vit(0), mode="mp", config={"sparsity": 0.5, "pattern": "2:4", "restore": True, "forward_loop": loop}
    )
    fc1 = model.blocks[0].mlp.fc1
    raw = dict(fc1.named_parameters())["weight"].detach()
    assert torch.equal(raw, fc1.weight.detach())  # restored values live in the parameter itself
    assert check_nm(raw, 2, 4)
    assert "restore" in mpm.plan_of(model).applied["layers"]["blocks.0.mlp.fc1"]
    assert mpm.plan_of(model).method == DEFAULT_RESTORE_BUDGET and mpm.plan_of(masked).method == DEFAULT_BUDGET
    with torch.no_grad():
        ref = dense(test)
        assert (model(test) - ref).square().mean() < (masked(test) - ref).square().mean()
    y = model(test)
    mto.save(model, str(tmp_path / "mp.pth"))
    torch.save({"x": test, "y": y}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, timm
        import mp_plugin.integrations.modelopt as mpm
        torch.manual_seed(123)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4).eval()
        model = mpm.restore(model, r"{tmp_path / "mp.pth"}")
        io = torch.load(r"{tmp_path / "io.pt"}")
        assert torch.equal(model(io["x"]), io["y"]), "restored outputs differ"
        assert "restore" in mpm.plan_of(model).applied["layers"]["blocks.0.mlp.fc1"], "restore record lost"
        print("RESTORE_OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "RESTORE_OK" in out.stdout, out.stderr[-3000:]


def test_certify_modelopt_replays_the_mp_permutation_on_the_dense_model() -> None:
    """certify_modelopt reads the plan from the model's ModelOpt state: R = W_dense − W_sparse lives only on the
    pruned entries of a permuted layer (without the alignment nearly every entry would differ)."""
    from mp_plugin.integrations.modelopt_certificate import certify_modelopt

    x = torch.randn(4, 3, 32, 32)
    dense = _vit(0, depth=2)
    sparse = mts.sparsify(
        _vit(0, depth=2), mode="mp", config={"sparsity": 0.5, "pattern": "2:4", "permute": "swap", "calibration": x}
    )
    perms = PermutationRecord.from_plan(mpm.plan_of(sparse)).permutations
    assert perms
    cert = certify_modelopt(dense, sparse, x)
    by_name = {layer.name: layer for layer in cert.layers}
    for name in perms:
        assert by_name[name].norms["r_changed"] == sparse.get_submodule(name).weight.numel() // 2
    assert isinstance(sparse.get_submodule(next(iter(perms))), mpm.SparseModule)  # the model keeps its ModelOpt form


def test_mp_mode_masks_follow_the_plan_not_the_zeros() -> None:
    """A zero-initialised head (left dense by the plan) stays trainable; a kept exact zero keeps its slot."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10)
    with torch.no_grad():
        m.head.weight.zero_()
        m.blocks[0].mlp.fc1.weight[0, :8] = 0.0  # two whole 2:4 groups of exact zeros
    s = mts.sparsify(m, mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    assert "head" not in {lp.name for lp in mpm.plan_of(s).layers}
    assert s.head._weight_mask is None or bool(s.head._weight_mask.all())
    fc1 = s.blocks[0].mlp.fc1
    assert fc1._weight_mask.float().mean().item() == pytest.approx(0.5)  # exactly 2 of every 4, zeros included
    s.train()
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(s(x), y).backward()
        opt.step()
    assert int((s.head.weight != 0).sum()) == s.head.weight.numel()


def test_mp_mode_unstructured_mask_keeps_the_plans_count_when_weights_are_already_zero() -> None:
    """A layer with more exact zeros than its plan prunes: the mask keeps numel − n_prune entries."""
    m = _vit(0, depth=2)
    with torch.no_grad():
        w = m.blocks[0].mlp.fc1.weight
        w.view(-1)[: int(0.8 * w.numel())] = 0.0  # 80 % zeros already, more than any 50 % plan prunes here
    s = mts.sparsify(m, mode="mp", config={"sparsity": 0.5, "pattern": "unstructured", "budget": "uniform"})
    modules = dict(s.named_modules())
    for lp in mpm.plan_of(s).layers:
        mask = modules[lp.name]._weight_mask
        assert int(mask.sum()) == mask.numel() - lp.n_prune, lp.name


def test_keep_exactly_tops_up_a_channels_last_weight() -> None:
    w = torch.randn(4, 3, 3, 3)
    w[:, :2] = 0.0
    w = w.to(memory_format=torch.channels_last)
    mask = mpm._keep_exactly(w, w.numel() - 10)
    assert int(mask.sum()) == w.numel() - 10 and bool(mask[w != 0].all())
