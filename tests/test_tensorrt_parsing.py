"""TensorRT adapter: log/layer-info parsing, trtexec line, refusals; engine builds skip without TensorRT.

The samples in tests/data/ are written for these tests in the formats that public
TensorRT issues show: builder ``(Sparsity)`` lines (NVIDIA/TensorRT #1403, #2169, #4054)
and ``--exportLayerInfo`` / engine-inspector JSON with ``HasSparseWeights``,
``TacticName`` and ``Metadata`` (NVIDIA/TensorRT #2418, #4020, #4056).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from mp_plugin.integrations.tensorrt import (
    TensorRTNotInstalled,
    build_engine,
    check_engine_pattern,
    engine_sparsity_report,
    parse_build_log,
    parse_layer_info,
    trtexec_command,
)

from mp_plugin.errors import PatternError

DATA = Path(__file__).parent / "data"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_parse_build_log_lists_eligible_and_picked():
    eligible, picked = parse_build_log((DATA / "trt_build_log_sample.txt").read_text())
    assert eligible == [
        "/blocks.0/attn/qkv/MatMul",
        "/blocks.0/mlp/fc1/MatMul + /blocks.0/mlp/act/Gelu",
        "/blocks.0/mlp/fc2/MatMul",
        "Conv_12 + Relu_13",
    ]
    assert picked == ["/blocks.0/mlp/fc1/MatMul + /blocks.0/mlp/act/Gelu", "Conv_12 + Relu_13"]


def test_parse_build_log_python_logger_format_with_empty_picked_list():
    eligible, picked = parse_build_log((DATA / "trt_build_log_empty_sample.txt").read_text())
    assert eligible == ["Conv_0"]
    assert picked == []


def test_parse_layer_info_fields():
    layers = parse_layer_info((DATA / "trt_layer_info_sample.json").read_text())
    by_name = {entry["name"]: entry for entry in layers}
    assert len(layers) == 7
    conv = by_name["Conv_12 + Relu_13"]
    assert conv["has_sparse_weights"] is True and conv["sparse_tactic"] is True
    assert conv["onnx_nodes"] == ["Conv_12", "Relu_13"]
    assert by_name["/head/Gemm"]["has_sparse_weights"] is False
    assert by_name["/norm/LayerNormalization"]["has_sparse_weights"] is None
    assert by_name["/blocks.0/attn/qkv/MatMul"]["sparse_tactic"] is False


def test_sparsity_report_merges_log_and_layer_info():
    report = engine_sparsity_report(
        (DATA / "trt_build_log_sample.txt").read_text(), (DATA / "trt_layer_info_sample.json").read_text()
    )
    rows = {r.name: r for r in report.layers}
    assert report.log_found
    assert report.n_eligible == 4 and report.n_sparse == 2
    assert rows["Conv_12 + Relu_13"].ran_sparse and rows["Conv_12 + Relu_13"].why_not == ""
    assert not rows["/blocks.0/attn/qkv/MatMul"].ran_sparse
    assert "dense kernel timed faster" in rows["/blocks.0/attn/qkv/MatMul"].why_not
    assert not rows["/head/Gemm"].eligible and "not eligible" in rows["/head/Gemm"].why_not
    assert "/norm/LayerNormalization" not in rows  # not a compute layer
    text = report.to_text()
    assert "2 of 4 eligible layers ran sparse kernels" in text


def test_sparsity_report_from_layer_info_alone_uses_tactic_names():
    report = engine_sparsity_report("", (DATA / "trt_layer_info_sample.json").read_text())
    assert not report.log_found
    assert {r.name for r in report.layers if r.ran_sparse} == {
        "Conv_12 + Relu_13",
        "/blocks.0/mlp/fc1/MatMul + /blocks.0/mlp/act/Gelu",
    }
    assert "no '(Sparsity)' lines" in report.to_text()


def test_trtexec_command_uses_enable_not_force():
    line = trtexec_command("/tmp/m.onnx")
    assert line.startswith("trtexec --onnx=/tmp/m.onnx")
    assert "--sparsity=enable" in line and "force" not in line
    assert "--exportLayerInfo=" in line and "--profilingVerbosity=detailed" in line
    assert "--sparsity" not in trtexec_command("/tmp/m.onnx", sparse=False)


@pytest.mark.parametrize("pattern", ["6:12", "8:16", "4:8", "12:16"])
def test_sparse_engine_refuses_accuracy_only_patterns(pattern, tmp_path):
    with pytest.raises(PatternError, match="TensorRT cannot run .* sparsity"):
        check_engine_pattern(pattern)
    with pytest.raises(PatternError, match="only take 2:4"):
        build_engine(tmp_path / "m.onnx", pattern=pattern)
    assert check_engine_pattern("2:4").hardware


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_gives_clear_message(tmp_path):
    with pytest.raises(TensorRTNotInstalled, match="TensorRT is not installed"):
        build_engine(tmp_path / "m.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a GPU")
def test_build_sparse_engine_reports_layers(tmp_path):  # pragma: no cover - needs TensorRT
    import torch
    from mp_plugin.integrations.onnx import export_onnx

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lin = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    with torch.no_grad():
        for m in (lin[0], lin[2]):
            m.weight.view(m.weight.shape[0], -1, 4)[..., :2] = 0
    onnx_path = tmp_path / "mlp.onnx"
    export_onnx(lin, onnx_path, (64, 256), dtype="fp16", selection=None)
    build = build_engine(onnx_path, sparse=True)
    assert build.engine_path.exists()
    assert build.report.log_found
    assert build.report.n_sparse >= 1, build.report  # at least one layer ran a sparse tactic
    assert any(row.ran_sparse for row in build.report.layers)


def test_io_buffers_take_the_tensors_own_type_and_integers_are_valid_indices():
    import torch
    from mp_plugin.integrations.tensorrt import TensorRTError, io_buffer

    assert io_buffer((2, 3), "HALF", "cpu").dtype == torch.float16
    ids = io_buffer((2, 5), "INT64", "cpu")
    assert ids.dtype == torch.int64 and int(ids.abs().sum()) == 0  # token ids: 0 is a valid index
    assert io_buffer((4,), "BOOL", "cpu").dtype == torch.bool
    with pytest.raises(TensorRTError, match="FP8"):
        io_buffer((1,), "FP8", "cpu")


def test_onnx_is_fp16_reads_the_graph_inputs(tmp_path):
    pytest.importorskip("onnx")
    import torch
    from mp_plugin.integrations.tensorrt import onnx_is_fp16

    model = torch.nn.Linear(8, 4)
    for dtype, expect in ((torch.float32, False), (torch.float16, True)):
        path = tmp_path / f"m_{expect}.onnx"
        torch.onnx.export(model.to(dtype), (torch.randn(2, 8, dtype=dtype),), str(path), dynamo=False)
        assert onnx_is_fp16(path) is expect
