"""ONNX export: the 2:4 pattern survives on the right axis, ORT matches torch, bad input is refused.

Exports are slow on 2 cores, so each architecture is exported once per module and
shared by the tests that read it.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from mp_plugin.masks.select import check_nm as mp_check_nm

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")

from conftest import make_mlp  # noqa: E402
from mp_plugin.integrations.onnx import (  # noqa: E402
    ExportError,
    check_onnx_nm,
    export_onnx,
    nm_violations,
)
from onnx import numpy_helper  # noqa: E402

from mp_plugin.layers.discovery import find_target_layers  # noqa: E402
from mp_plugin.masks.select import nm_mask  # noqa: E402

ARCHS = {
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, (2, 3, 32, 32)),
    "resnet18": ({}, (1, 3, 64, 64)),
    "convnext_atto": ({}, (1, 3, 64, 64)),
    "mobilenetv3_small_100": ({}, (1, 3, 64, 64)),
}


def prune_24(model: nn.Module) -> list[str]:
    """2:4-prune every eligible target layer in place; returns their names."""
    targets, _ = find_target_layers(model)
    names = []
    with torch.no_grad():
        for t in targets:
            if t.shape[1] % 4 == 0:
                t.module.weight.mul_(nm_mask(t.module.weight))
                names.append(t.name)
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """{arch: (report, pruned layer names)} — exported lazily, once per module."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(arch: str, **kwargs):
        key = arch + repr(sorted(kwargs.items()))
        if key not in cache:
            torch.manual_seed(0)
            if arch == "efficientnet_lite0":
                # a copy: prune_24 works in place and the session model is shared
                model, shape = copy.deepcopy(request.getfixturevalue("_pristine_efficientnet_lite0")), (1, 3, 96, 96)
            else:
                kw, shape = ARCHS[arch]
                model = timm.create_model(arch, **kw).eval()
            names = prune_24(model)
            path = root / f"{arch}_{len(cache)}.onnx"
            cache[key] = (export_onnx(model, path, shape, **kwargs), names)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", [*ARCHS, "efficientnet_lite0"])
def test_export_keeps_24_and_matches_torch(exported, arch):
    report, names = exported(arch)
    assert names, "no layer was pruned"
    assert report.pattern_ok, report.to_text()
    assert sorted(c.layer for c in report.checks) == sorted(names)
    assert all(c.groups > 0 and c.bad_groups == 0 for c in report.checks)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    onnx.checker.check_model(str(report.path))


def test_linear_lands_as_matmul_axis0_and_conv_as_flattened_rows(exported):
    vit, _ = exported("vit_tiny_patch16_224")
    assert {(c.op, c.axis) for c in vit.checks} == {("MatMul", 0)}
    res, _ = exported("resnet18")
    assert {(c.op, c.axis) for c in res.checks} == {("Conv", 1)}
    # the axis matters: a MatMul B (in, out) read along the wrong axis is not 2:4
    proto = onnx.load(str(vit.path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    b = inits[vit.checks[0].name]
    assert nm_violations(b, 2, 4, axis=0)[0] == 0
    assert nm_violations(b, 2, 4, axis=1)[0] > 0


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "resnet18"])
def test_broken_initializer_fails_the_check(exported, arch, tmp_path):
    report, _ = exported(arch)
    proto = onnx.load(str(report.path))
    target = report.checks[1]
    init = next(i for i in proto.graph.initializer if i.name == target.name)
    arr = numpy_helper.to_array(init).copy()
    if target.axis == 0:
        arr[:4, 0] = 1.0  # one full group along the input axis of a MatMul B
    else:
        # one full group: the first 4 input channels of output row 0 at the first kernel position
        arr[(0, slice(0, 4)) + (0,) * (arr.ndim - 2)] = 1.0
    init.CopyFrom(numpy_helper.from_array(arr, target.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    checks = {c.name: c for c in check_onnx_nm(broken, report.expected)}
    assert not checks[target.name].ok and checks[target.name].bad_groups == 1
    assert sum(not c.ok for c in checks.values()) == 1
    assert all(c.ok for c in check_onnx_nm(report.path, report.expected))


def test_fp16_export_keeps_the_pattern(exported):
    report, _ = exported("vit_tiny_patch16_224", dtype="fp16")
    assert report.pattern_ok and report.parity_ok
    proto = onnx.load(str(report.path))
    dtypes = {i.data_type for i in proto.graph.initializer if i.name in report.expected}
    assert dtypes == {onnx.TensorProto.FLOAT16}


def test_gemm_rewrite_moves_pattern_to_axis1_and_keeps_parity(exported):
    report, names = exported("vit_tiny_patch16_224", gemm_rewrite=True)
    assert report.gemm_rewrites == len(names)
    assert {(c.op, c.axis) for c in report.checks} == {("Gemm", 1)}
    assert report.pattern_ok and report.max_abs_diff <= 1e-4
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert ops.count("Gemm") == len(names) + 1  # plus the classifier head


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_unsquashed_parametrizations_refused_then_folded(tmp_path):
    mlp = make_mlp((32, 64, 64, 16))
    for layer in (mlp[0], mlp[2], mlp[4]):
        parametrize.register_parametrization(layer, "weight", _Mask(nm_mask(layer.weight)))
    with pytest.raises(ExportError, match="parametrizations .*fold=True"):
        export_onnx(mlp, tmp_path / "m.onnx", (4, 32))
    report = export_onnx(mlp, tmp_path / "m.onnx", (4, 32), fold=True)
    assert report.pattern_ok and len(report.checks) == 3 and report.max_abs_diff <= 1e-4
    assert parametrize.is_parametrized(mlp[0])  # the caller's model is untouched
    assert mp_check_nm(mlp[0].weight, 2, 4) and mlp(torch.randn(2, 32)).shape == (2, 16)  # and still masks


def test_masks_never_applied_lists_layers(tmp_path):
    mlp = make_mlp((32, 64, 64, 16))
    with torch.no_grad():
        mlp[0].weight.mul_(nm_mask(mlp[0].weight))
    with pytest.raises(ExportError, match=r"2 target layers are not k:n.*'2 \(2:4\)', '4 \(2:4\)'"):
        export_onnx(mlp, tmp_path / "m.onnx", (4, 32))
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_prints_check_and_trtexec(tmp_path, capsys):
    from mp_plugin.cli.main import main

    out = tmp_path / "cli.onnx"
    rc = main(["export", "resnet18", "--random-init", "--magnitude-24", "--input-shape", "1,3,32,32", "--out", str(out),
               "--dtype", "fp16", "--trtexec"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "19/19 initializers keep their pattern" in text
    parity = re.search(r"onnxruntime parity \(fp16\): max \|Δ\| = (\S+) \(tol (\S+)\) (\w+)", text)
    assert parity is not None, text
    assert parity.group(3) == "ok" and float(parity.group(1)) <= float(parity.group(2))
    assert f"trtexec --onnx={out}" in text and "--sparsity=enable" in text


def test_nm_violations_counts_groups():
    arr = np.zeros((2, 8), dtype=np.float32)
    arr[0, :3] = 1.0
    assert nm_violations(arr, 2, 4, axis=1) == (1, 4)
    assert nm_violations(arr, 2, 4, axis=0) == (0, 0)  # 2 rows: axis 0 is not a multiple of 4


def test_nm_violations_reads_conv_weights_along_input_channels():
    """A Conv weight passes only with 2:4 along the input channels at each kernel position."""
    from mp_plugin.masks.select import nm_mask

    w = torch.randn(8, 8, 3, 3)
    good = (w * nm_mask(w, 2, 4)).numpy()
    assert nm_violations(good, 2, 4, axis=1) == (0, 8 * 9 * 2)
    flat = w.reshape(8, -1, 4)  # 2:4 over the flattened C_in·kh·kw row: not what TensorRT runs
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.abs().topk(2, dim=-1).indices, True)
    bad = (flat * keep).reshape(8, 8, 3, 3).numpy()
    assert nm_violations(bad, 2, 4, axis=1)[0] > 0
    assert nm_violations(np.zeros((8, 6, 2, 2), np.float32), 2, 4, axis=1) == (0, 0)  # 6 channels: not eligible


def test_cli_export_of_a_plan_with_the_head_opset_and_nested_json(tmp_path, capsys):
    """A plan made with --include-head exports (its own layer selection); --opset is honoured; --json makes its folder."""
    import json

    from mp_plugin.cli.main import main

    out = tmp_path / "head"
    assert main(["prune", "fmnist_cnn", "--pattern", "2:4", "--include-head", "--out", str(out)]) == 0
    assert "9" in {lp["name"] for lp in json.loads((out / "plan.json").read_text())["layers"]}
    onnx_path, report = tmp_path / "m.onnx", tmp_path / "new" / "dir" / "report.json"
    argv = ["export", "fmnist_cnn", "--checkpoint", str(out / "model.safetensors"), "--plan", str(out / "plan.json")]
    argv += ["--input-shape", "1,1,28,28", "--opset", "13", "--out", str(onnx_path), "--json", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr()
    assert "opset 13" in text.out and "Traceback" not in text.err
    assert json.loads(report.read_text())["opset"] == 13
    assert onnx.load(str(onnx_path)).opset_import[0].version == 13


def test_a_file_that_fails_verification_is_set_aside(tmp_path):
    model = make_mlp()
    prune_24(model)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="moved to"):
        export_onnx(model, path, (2, 32), parity_tol=-1.0)  # no output can be that close
    assert not path.exists() and (tmp_path / "m.unverified.onnx").exists()


def test_dynamic_batch_export_runs_at_another_batch_size(tmp_path):
    import onnxruntime as ort

    model = make_mlp((32, 64, 64, 8)).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.mul_(nm_mask(m.weight, 2, 4))
    fixed = export_onnx(model, tmp_path / "fixed.onnx", (2, 32))
    free = export_onnx(model, tmp_path / "free.onnx", (2, 32), dynamic_batch=True)
    assert fixed.parity_ok and free.parity_ok and free.pattern_ok
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = ort.InferenceSession(str(tmp_path / "free.onnx")).run(None, {"input": x})[0]
    assert np.abs(out - ref).max() < 1e-4
    with pytest.raises(Exception, match="(?i)dimension|invalid"):  # the default keeps the batch of the example
        ort.InferenceSession(str(tmp_path / "fixed.onnx")).run(None, {"input": x})


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


def test_parity_covers_every_output(tmp_path):
    from mp_plugin.integrations.onnx_check import onnx_parity

    torch.manual_seed(0)
    model = _TwoHeads().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(nm_mask(m.weight, 2, 4))
    report = export_onnx(model, tmp_path / "two.onnx", (2, 16), pattern=None)
    assert report.parity_ok
    x = torch.randn(2, 16)
    with torch.no_grad():
        refs = [t.numpy() for t in model(x)]
    assert onnx_parity(tmp_path / "two.onnx", x.numpy(), refs) < 1e-5
    wrong = [refs[0], refs[1] + 1.0]  # only the second output differs
    assert onnx_parity(tmp_path / "two.onnx", x.numpy(), wrong) == pytest.approx(1.0, abs=1e-5)
    assert onnx_parity(tmp_path / "two.onnx", x.numpy(), refs[:1]) == float("inf")


def _pruned_24(model: nn.Module):
    import mp_plugin as mp

    p = mp.plan(model, 0.5, "2:4", config=mp.PlanConfig(selection=mp.LayerSelection(exclude_head=False)))
    mp.apply(model, p)
    return p


def test_fp16_export_with_a_free_batch_axis_verifies_and_leaves_the_model_float32(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    p = _pruned_24(model)
    report = export_onnx(model, tmp_path / "m.onnx", (2, 32), dtype="fp16", plan=p, dynamic_batch=True)
    assert report.pattern_ok and (tmp_path / "m.onnx").exists()
    assert all(t.dtype == torch.float32 for t in model.parameters())  # the caller's model is not converted


class _NaNSecond(nn.Module):
    """Two outputs; the second is finite in float32 but NaN in float16 (z·1e6 overflows to inf, inf − inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.b(torch.relu(self.a(x)))
        return z, (z * 1e6 - z * 1e6) + z


def test_a_nan_in_any_output_fails_the_parity_check(tmp_path) -> None:
    torch.manual_seed(0)
    model = _NaNSecond()
    p = _pruned_24(model)
    with pytest.raises(ExportError, match="differs"):
        export_onnx(model, tmp_path / "m.onnx", (2, 32), dtype="fp16", plan=p)
    assert not (tmp_path / "m.onnx").exists() and (tmp_path / "m.unverified.onnx").exists()
