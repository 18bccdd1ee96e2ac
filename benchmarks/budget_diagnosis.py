"""Why does SEB lose to global magnitude? Per-layer sensitivity against spectral signals (issue 8).

For every target layer of a model, prune *only that layer* to 50 % (smallest |W|)
and measure the fidelity loss to the dense model (1 − embedding cosine for
MiniLM, KL for the classifiers). That is the layer's measured sensitivity. Then:

* Spearman ρ between sensitivity and each per-layer signal (σ₊, the shape-free
  σ̂, Hill α, bulk fraction, spike energy, layer size). The paper's rule prunes
  layers with higher σ₊ *more*, which only makes sense if ρ(σ₊, sensitivity) ≤ 0.
* Spearman ρ between sensitivity and the per-layer sparsity each budget assigns
  at 50 % total (SEB, SEB reversed, global magnitude): a good budget prunes
  sensitive layers less, i.e. ρ < 0.
* A sensitivity **oracle**: SEB's own weighting rule fed with the measured
  sensitivity (w_ℓ = exp(−z_ℓ), z = standardised log sensitivity) and applied by
  the same exact global |W|/w_ℓ threshold. It uses information no data-free
  rule has; if even it cannot beat global magnitude, no per-layer reallocation
  on top of global magnitude can, whatever the signal.

Usage::

    python benchmarks/budget_diagnosis.py --models minilm efficientnet_lite0 fmnist_cnn --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import TASKS, Task  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from mp_plugin.budget.rules import SEBConfig  # noqa: E402
from mp_plugin.masks.counts import global_prune_counts  # noqa: E402
from mp_plugin.masks.select import unstructured_mask  # noqa: E402
from mp_plugin.planning.build import PlanConfig, plan  # noqa: E402

SPARSITY = 0.5
SIGNALS = ("sigma_plus", "sigma", "hill_alpha", "bulk_fraction", "spike_energy_fraction")
BUDGETS = ("seb", "seb_reversed", "global_magnitude")


def _loss(task: Task, metrics: dict[str, float]) -> float:
    """Fidelity loss: 1 − cosine for MiniLM embeddings, KL otherwise (0 = dense)."""
    if task.name == "minilm":
        return 1.0 - metrics["embedding_cosine"]
    return metrics["kl"]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman ρ over the layers where both are finite (tied values get average ranks)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def correlations(layers: list[dict]) -> dict[str, dict[str, float]]:
    """Spearman ρ of each per-layer signal and each budget with the measured sensitivity."""
    sens = np.asarray([r["sensitivity"] for r in layers])
    col = lambda key: np.asarray([r[key] for r in layers], dtype=float)  # noqa: E731
    return {
        "spearman_signal_vs_sensitivity": {k: _spearman(col(k), sens) for k in (*SIGNALS, "numel")},
        "spearman_budget_vs_sensitivity": {k: _spearman(col(f"budget_{k}"), sens) for k in BUDGETS},
    }


def _prune_counts(task: Task, names: list[str], counts: list[int]) -> torch.nn.Module:
    m = copy.deepcopy(task.model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, c in zip(names, counts):
            w = mods[name].weight
            w.mul_(unstructured_mask(w, c).to(w.dtype))
    return m


def diagnose(task: Task) -> dict:
    """Sensitivities, signals, correlations and the oracle for one model."""
    t0 = time.perf_counter()
    p = plan(copy.deepcopy(task.model), SPARSITY, "unstructured", "seb")
    p_rev = plan(copy.deepcopy(task.model), SPARSITY, "unstructured", "seb", PlanConfig(seb=SEBConfig(direction=-1.0)))
    p_glob = plan(copy.deepcopy(task.model), SPARSITY, "unstructured", "magnitude")
    names = [lp.name for lp in p.layers]
    mods = dict(task.model.named_modules())
    sens = []
    for lp in p.layers:
        m = _prune_counts(task, [lp.name], [lp.numel // 2])
        sens.append(_loss(task, task.evaluate(m)))
        print(f"[{task.name}] {lp.name:<48} {tuple(lp.weight_shape)!s:<20} loss {sens[-1]:.5f}", flush=True)
    sens_a = np.asarray(sens)
    signals = {
        s: np.asarray([getattr(lp.fit, s) if lp.fit is not None else np.nan for lp in p.layers]) for s in SIGNALS
    }
    signals["numel"] = np.asarray([lp.numel for lp in p.layers], dtype=float)
    budgets = {
        "seb": np.asarray([lp.unstructured_budget for lp in p.layers]),
        "seb_reversed": np.asarray([lp.unstructured_budget for lp in p_rev.layers]),
        "global_magnitude": np.asarray([lp.unstructured_budget for lp in p_glob.layers]),
    }
    # the oracle: SEB's weighting, fed with measured sensitivity (sensitive → smaller w → pruned less)
    z = np.log(np.maximum(sens_a, 1e-12))
    z = (z - z.mean()) / (z.std() + 1e-12)
    w_oracle = np.exp(-z)
    weights = [mods[n].weight for n in names]
    results = {}
    for label, layer_w in (("global_magnitude", np.ones(len(names))), ("oracle", w_oracle)):
        counts = global_prune_counts(weights, layer_w.tolist(), SPARSITY)
        results[label] = task.evaluate(_prune_counts(task, names, counts))
    for label, pl in (("seb", p), ("seb_reversed", p_rev)):
        results[label] = task.evaluate(_prune_counts(task, names, [lp.n_prune for lp in pl.layers]))
    for label, r in results.items():
        print(f"[{task.name}] 50% {label:<18} {r}", flush=True)
    layers = [
        {
            "name": n,
            "weight_shape": list(lp.weight_shape),
            "layer_type": lp.layer_type,
            "sensitivity": float(s),
            **{k: float(v[i]) for k, v in signals.items()},
            **{f"budget_{k}": float(v[i]) for k, v in budgets.items()},
        }
        for i, (n, lp, s) in enumerate(zip(names, p.layers, sens))
    ]
    return {
        "model": task.name,
        "loss": "1 - embedding cosine" if task.name == "minilm" else "KL(dense || pruned)",
        "layers": layers,
        **correlations(layers),
        "at_50_percent": results,
        "seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "loadavg_end": list(os.getloadavg()),
    }


def to_markdown(res: list[dict]) -> str:
    """One row per model: correlations and the 50 % comparison."""
    lines = [
        "| model | ρ(σ₊, sens.) | ρ(σ̂, sens.) | ρ(spike energy, sens.) | ρ(size, sens.) | ρ(SEB budget, sens.) "
        "| ρ(global-mag. budget, sens.) | 50 %: global mag. | SEB | SEB reversed | oracle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        s, b, a = r["spearman_signal_vs_sensitivity"], r["spearman_budget_vs_sensitivity"], r["at_50_percent"]
        key = "embedding_cosine" if r["model"] == "minilm" else "kl"
        lines.append(
            f"| {r['model']} | {s['sigma_plus']:+.2f} | {s['sigma']:+.2f} | {s['spike_energy_fraction']:+.2f} | "
            f"{s['numel']:+.2f} | {b['seb']:+.2f} | "
            f"{b['global_magnitude']:+.2f} | {a['global_magnitude'][key]:.3f} | {a['seb'][key]:.3f} | "
            f"{a['seb_reversed'][key]:.3f} | {a['oracle'][key]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """CLI entry: writes benchmarks/results/budget_diagnosis.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "efficientnet_lite0", "fmnist_cnn"], choices=list(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="recompute the correlations from the stored per-layer measurements, rewrite the JSON fields and the .md",
    )
    args = ap.parse_args(argv)
    if args.table_only:
        path = RESULTS / "budget_diagnosis.json"
        data = json.loads(path.read_text())
        for r in data["models"]:
            r.update(correlations(r["layers"]))
        path.write_text(json.dumps(data, indent=1))
        path.with_suffix(".md").write_text(to_markdown(data["models"]))
        print(to_markdown(data["models"]))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = [diagnose(TASKS[name]()) for name in args.models]
    path = write_result("budget_diagnosis", {"sparsity": SPARSITY, "models": res}, packages=("transformers",))
    path.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
