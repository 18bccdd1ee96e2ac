"""Benchmark path: CPU reports MACs only (and says so); GPU timings run only with CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from mp_plugin.evaluation.latency import environment_info, prune_24_, run_benchmark

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
def test_cli_bench_measures_the_given_checkpoint(tmp_path, capsys):
    """bench reads the pruned checkpoint and its plan; an unpruned model is reported dense, not re-pruned."""
    from mp_plugin.cli.main import main
    from mp_plugin.evaluation.models import load_model
    from mp_plugin.masks.macs import count_macs

    name = "resnet18"
    pruned = tmp_path / "pruned"
    prune = ["prune", name, "--random-init", "--pattern", "2:4", "--out", str(pruned)]
    assert main(prune) == 0
    ckpt, plan = pruned / "model.safetensors", pruned / "plan.json"
    out = tmp_path / "b.json"
    common = ["--batch", "2", "--input-size", "32", "--no-linear"]
    assert main(["bench", name, "--checkpoint", str(ckpt), "--plan", str(plan), *common, "--out", str(out)]) == 0
    assert "only MACs" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["timings"] is None and result["model"]["checkpoint"] == str(ckpt)
    expected = count_macs(load_model(name, checkpoint=ckpt), (1, 3, 32, 32), "auto")
    assert result["macs"]["dense_macs"] == expected.dense * 2
    assert result["macs"]["sparse_24_macs"] == expected.sparse * 2 < expected.dense * 2
    dense_out = tmp_path / "dense.json"
    assert main(["bench", name, "--random-init", *common, "--out", str(dense_out)]) == 0
    dense = json.loads(dense_out.read_text())["macs"]
    assert dense["sparse_24_macs"] == dense["dense_macs"]  # nothing pruned behind the user's back
    assert main(["bench", name, "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2


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
    from mp_plugin.evaluation.latency import bench_linear_shapes

    rows = bench_linear_shapes(batch=2, dtype="fp16", shapes={"fc1": (768, 3072)}, warmup=1, iters=3)
    ran = [backend for backend in ("cusparselt", "cutlass") if "error" not in rows[0][backend]]
    assert ran, rows  # at least one 2:4 backend must run on a GPU that has one
    for backend in ran:
        entry = rows[0][backend]
        assert entry["max_rel_err"] < 1e-2 and entry["median_ms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_end_to_end_small_vit_on_gpu():  # pragma: no cover - GPU only
    from mp_plugin.evaluation.latency import bench_model

    result = bench_model("vit_tiny_patch16_224", batch=8, warmup=1, iters=3)
    assert result["dense"]["median_ms"] > 0
    assert "error" not in result["sparse_24"], result["sparse_24"]
    assert result["sparse_layers"] == 4 * 12 and result["sparse_24"]["max_rel_err"] < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_end_to_end_times_the_given_pruned_model():  # pragma: no cover - GPU only
    import timm

    import mp_plugin as mp
    from mp_plugin.evaluation.latency import bench_model

    model = timm.create_model("vit_tiny_patch16_224").eval()
    p = mp.plan(model, 0.5, "2:4", "seb")
    mp.apply(model, p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [lp.name for lp in p.layers if lp.pattern == "2:4"]
    result = bench_model(model, batch=8, warmup=1, iters=3, sparse_layers=names)
    assert "error" not in result["sparse_24"], result["sparse_24"]
    assert result["sparse_layers"] == len(names) > 0 and result["weights"].startswith("the given model")
    assert result["sparse_24"]["max_rel_err"] < 5e-2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
