"""The main job end to end on the real EfficientNet-Lite0 with real photographs (small settings)."""

from __future__ import annotations

import json

import pytest

from mp_plugin.pipeline import DEFAULT_VARIANTS, MainJobConfig, run_main_job

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("onnxruntime")


_SMALL = {"magnitude 2:4", "MP 2:4 (SEB+CAST)", "MP 2:4 (CAST-OBS+perm+restore)"}


def test_main_job_small(tmp_path) -> None:
    cfg = MainJobConfig(
        n_eval=6,
        n_calib=4,
        image_size=96,
        variants=tuple(v for v in DEFAULT_VARIANTS if v.label in _SMALL),
        out=str(tmp_path),
        plots=False,
    )
    lines: list[str] = []
    results = run_main_job(cfg, log=lines.append)
    assert {r["variant"] for r in results["rows"]} == _SMALL
    restored = next(r for r in results["rows"] if r["restore"])
    plain = next(r for r in results["rows"] if r["variant"] == "magnitude 2:4")
    assert restored["kl"] < plain["kl"]  # restore on the calibration crops brings the outputs closer to dense
    for r in results["rows"]:
        assert r["kn_valid"] and 0.5 <= r["sparsity"] < 0.501  # exact 2:4; a few weights were already 0
        assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl"] >= 0.0
    assert results["onnx"]["pattern_ok"] and results["onnx"]["parity_ok"]
    assert 0.0 <= results["certificate"]["preserved_fraction"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
    assert (tmp_path / "plan.json").exists() and (tmp_path / "certificate.json").exists()
    assert any("summary" in line for line in lines)
