"""ModelOpt 0.47 (real, no mocks): mode "mp", save/restore in a fresh process, export, KD chaining."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.masks.select import check_nm

mts = pytest.importorskip("modelopt.torch.sparsity")
mto = pytest.importorskip("modelopt.torch.opt")
mtd = pytest.importorskip("modelopt.torch.distill")
timm = pytest.importorskip("timm")
mpm = importlib.import_module("mp_plugin.integrations.modelopt")


def _vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4).eval()


def test_registration_is_idempotent() -> None:
    from modelopt.torch.sparsity.weight_sparsity.mode import SparsityModeRegistry

    importlib.reload(mpm)
    importlib.reload(mpm)
    assert "mp" in SparsityModeRegistry


@pytest.mark.parametrize(("pattern", "k", "n"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_mp_mode_kn_matches_plan(pattern: str, k: int, n: int) -> None:
    model = mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.5, "pattern": pattern})
    reference = mp.plan(_vit(0), 0.5, pattern)
    got = model._mp_plan
    assert [lp.name for lp in got.layers] == [lp.name for lp in reference.layers]
    assert [lp.w for lp in got.layers] == [lp.w for lp in reference.layers]
    fc1 = model.blocks[0].mlp.fc1
    assert check_nm(fc1.weight, k, n)  # the masked forward weight
    assert fc1._weight_mask.float().mean().item() == pytest.approx(k / n)


def test_mp_mode_unstructured_with_modelopt_pattern_spelling() -> None:
    model = mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.7, "pattern": "unstructured", "budget": "seb"})
    p = model._mp_plan
    zeros = sum(int((dict(model.named_modules())[lp.name].weight == 0).sum()) for lp in p.layers)
    assert zeros == sum(lp.n_prune for lp in p.layers)
    model2 = mts.sparsify(_vit(0), mode="mp", config={"pattern": "2:4 sparsity"})
    assert model2._mp_plan.pattern == "2:4"


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(mp.MPPluginError, match="unknown config keys"):
        mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.5, "bogus": 1})


def test_save_restore_in_fresh_process_is_bit_identical(tmp_path) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = mts.sparsify(_vit(0), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    y = model(x)
    mto.save(model, str(tmp_path / "mp.pth"))
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, timm
        import mp_plugin.integrations.modelopt as mpm
        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4).eval()
        model = mpm.restore(model, r"{tmp_path / "mp.pth"}")
        io = torch.load(r"{tmp_path / "io.pt"}")
        assert torch.equal(model(io["x"]), io["y"]), "restored outputs differ"
        import modelopt.torch.sparsity as mts
        plain = mts.export(model)
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
    masks = {
        n: m._weight_mask.clone() for n, m in student.named_modules() if getattr(m, "_weight_mask", None) is not None
    }
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
    plain = mts.export(mtd.export(distill))
    assert type(plain.blocks[0].mlp.fc1) is nn.Linear
    assert mp.sparsity_report(plain, student._mp_plan).kn_valid


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
    assert "restore" in model._mp_plan.applied["layers"]["blocks.0.mlp.fc1"]
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
        print("RESTORE_OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "RESTORE_OK" in out.stdout, out.stderr[-3000:]
