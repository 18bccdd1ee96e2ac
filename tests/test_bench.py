"""Benchmark path: CPU reports MACs only (and says so); GPU timings run only with CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from mp_plugin.bench import environment_info, prune_24_, run_benchmark

pytest.importorskip("timm")
SMALL_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_cpu_reports_macs_only():
    result = run_benchmark("vit_tiny_patch16_224", batch=8, model_kwargs=SMALL_VIT)
    assert result["timings"] is None and "only MACs" in result["note"]
    macs = result["macs"]
    assert macs["counted_at_batch"] == 1 and macs["batch"] == 8
    assert macs["dense_macs"] > macs["sparse_24_macs"] > 0.5 * macs["dense_macs"]
    assert result["environment"]["gpu"] is None
    json.dumps(result)  # JSON-ready


def test_environment_info_versions():
    info = environment_info()
    assert info["torch"] == torch.__version__
    assert set(info) >= {"gpu", "driver", "cusparselt", "cuda"}


def test_prune_24_prunes_vit_linears():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", **SMALL_VIT)
    names = prune_24_(model)
    assert len(names) == 8 and all("blocks" in n for n in names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_cli_bench_on_cpu(tmp_path, capsys):
    from mp_plugin.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "2", "--out", str(out)]) == 0
    assert "only MACs" in capsys.readouterr().out
    assert json.loads(out.read_text())["timings"] is None


def test_gpu_bench_script_exits_cleanly_without_cuda(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("would run the full GPU benchmark")
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", Path(__file__).parents[1] / "benchmarks" / "gpu_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out-dir", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_linear_matches_dense_with_zeros():  # pragma: no cover - GPU only
    from mp_plugin.bench import bench_linear_shapes

    rows = bench_linear_shapes(batch=2, dtype="fp16", shapes={"fc1": (768, 3072)}, warmup=1, iters=3)
    for backend in ("cusparselt", "cutlass"):
        entry = rows[0][backend]
        if "error" not in entry:
            assert entry["max_rel_err"] < 1e-2 and entry["median_ms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_end_to_end_small_vit_on_gpu():  # pragma: no cover - GPU only
    from mp_plugin.bench import bench_model

    result = bench_model("vit_tiny_patch16_224", batch=8, warmup=1, iters=3)
    assert result["dense"]["median_ms"] > 0
    assert "error" in result["sparse_24"] or result["sparse_24"]["max_rel_err"] < 5e-2
