"""The certificate on the real pretrained EfficientNet-Lite0 with real photo crops, and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from mp_plugin.certificate import EXACT, certify
from mp_plugin.evaluation.photos import builtin_photo_crops
from mp_plugin.layers.discovery import find_target_layers
from mp_plugin.masks.select import unstructured_mask


def _magnitude_pruned(model: torch.nn.Module, fraction: float) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    targets, _ = find_target_layers(pruned)
    with torch.no_grad():
        for t in targets:
            if t.weight.shape[-1] == 1:  # the 1×1 convs
                t.weight.mul_(unstructured_mask(t.weight, int(fraction * t.weight.numel())))
    return pruned


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return builtin_photo_crops(6, seed=3)


def test_empirical_certificate_on_pretrained_efficientnet(efficientnet_lite0, crops):
    pruned = _magnitude_pruned(efficientnet_lite0, 0.1)
    cert = certify(efficientnet_lite0, pruned, crops, mode="empirical", precision=torch.float32)
    assert cert.eta_kind == EXACT and len(cert.layers) > 20
    assert all(layer.rpsi_inf.shape == (6,) and (layer.rpsi_inf >= 0).all() for layer in cert.layers)
    assert sum(bool((layer.rpsi_inf > 0).all()) for layer in cert.layers) > 20
    with torch.no_grad():
        zd, zp = efficientnet_lite0(crops).double(), pruned(crops).double()
    np.testing.assert_allclose(cert.eta, (zd - zp).abs().amax(1).numpy(), rtol=0, atol=1e-9)
    changed = (zd.argmax(1) != zp.argmax(1)).numpy()
    assert not (cert.preserved & changed).any()
    top2 = zd.topk(2, dim=1).values
    expected = (top2[:, 0] - top2[:, 1]).numpy() > 2 * cert.eta  # preserved ⇔ dense margin > 2η_s
    np.testing.assert_array_equal(cert.preserved, expected)
    assert cert.preserved_fraction == pytest.approx(expected.mean()) and cert.eta.min() > 0
    assert cert.claim == "measured"
    assert "preserved" in cert.summary()


def test_cli_certify_prints_summary_and_writes_json(efficientnet_lite0, tmp_path, capsys):
    from safetensors.torch import save_file

    from mp_plugin.cli.main import main

    pruned = _magnitude_pruned(efficientnet_lite0, 0.05)
    ckpt = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(ckpt))
    out = tmp_path / "report.json"
    rc = main(
        [
            "certify",
            "efficientnet_lite0",
            "--pruned",
            str(ckpt),
            "--data",
            "builtin-photos",
            "--n-images",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "MEASURED (mode=empirical)" in text and "preserved (margin > 2η), measured" in text
    fallback = [line for line in text.splitlines() if "cannot run on this model" in line]
    assert len(fallback) == 1 and "falling back to the measured (empirical) certificate" in fallback[0]
    data = json.loads(out.read_text())
    assert data["n_samples"] == 3 and data["eta_kind"] == EXACT and len(data["layers"]) > 20
    bad = main(["certify", "efficientnet_lite0", "--pruned", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert bad == 2
