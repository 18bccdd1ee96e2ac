"""The main job end to end on the real EfficientNet-Lite0 with real photographs (small settings)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mp_plugin as mp
from mp_plugin.evaluation.metrics import output_fidelity
from mp_plugin.evaluation.photos import real_photo_crops
from mp_plugin.evaluation.pipeline import DEFAULT_VARIANTS, MainJobConfig, run_main_job

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("onnxruntime")


_SMALL = {"magnitude 2:4", "MP 2:4 (SEB+CAST)", "MP 2:4 (CAST-OBS+perm+restore)"}


def test_main_job_small(tmp_path, efficientnet_lite0) -> None:
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
    # the reported fidelity is that of the pruned model on the eval crops: recompute one row independently
    x_eval = real_photo_crops(cfg.n_eval, cfg.image_size, seed=1)
    model = copy.deepcopy(efficientnet_lite0)
    mp.apply(model, mp.plan(model, cfg.sparsity, "2:4", "magnitude"))
    with torch.no_grad():
        fid = output_fidelity(efficientnet_lite0(x_eval), model(x_eval))
    assert plain["top1_agreement"] == pytest.approx(fid.top1_agreement)
    assert plain["kl"] == pytest.approx(fid.kl, rel=1e-4) and plain["cosine"] == pytest.approx(fid.cosine, rel=1e-4)
    assert results["onnx"]["pattern_ok"] and results["onnx"]["parity_ok"]
    # the certificate: the bound cannot run through EfficientNet's residual blocks, the job says so in one line
    # and reports a *measured* certificate, never "provably"
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert results["certificate"]["claim"] == cert["claim"] == "measured" and cert["mode"] == "empirical"
    assert results["certificate"]["preserved_fraction"] == pytest.approx(sum(cert["preserved"]) / cfg.n_eval)
    fallback = [line for line in lines if "cannot run on this model" in line]
    assert len(fallback) == 1 and "falling back to the measured (empirical) certificate" in fallback[0]
    assert not any("provabl" in line for line in lines)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
    assert (tmp_path / "plan.json").exists() and (tmp_path / "certificate.json").exists()
    assert any("summary" in line for line in lines)
