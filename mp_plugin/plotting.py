"""Plots of a plan: per-layer ESD histograms with the fitted MP law, and budgets per layer.

Needs matplotlib (``pip install 'mp-plugin[plot]'``); it is imported only here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import MPPluginError
from .spectrum import mp_density, mp_edges

if TYPE_CHECKING:
    from .planning import PrunePlan

__all__ = ["plot_plan", "plot_esd"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MPPluginError("plotting needs matplotlib: pip install 'mp-plugin[plot]'") from exc
    return plt


def plot_esd(ax, lp) -> None:
    """Draw one layer's eigenvalue histogram (λ = s²/n) with the fitted MP density and edge."""
    f = lp.fit
    n = max(f.shape)
    lam = np.asarray(f.singular_values, dtype=np.float64) ** 2 / n
    cut = f.threshold * 1.6 if f.threshold > 0 else lam.max()
    bulk = lam[lam <= cut]
    ax.hist(bulk, bins=int(np.clip(len(bulk) // 4, 10, 60)), density=True, color="#9ab", alpha=0.8, label="ESD")
    if f.sigma > 0:
        lo, hi = mp_edges(f.gamma, f.sigma**2)
        x = np.linspace(max(lo, 1e-12), hi, 400)
        ax.plot(x, mp_density(x, f.gamma, f.sigma**2) * len(lam) / max(len(bulk), 1), color="C3", label="MP fit")
        ax.axvline(f.threshold, color="k", ls="--", lw=1, label="σ₊² / n")
    ax.set_title(f"{lp.name[-34:]}\nspikes={f.n_spikes} μ={f.fit_error:.3f}", fontsize=7)
    ax.tick_params(labelsize=6)


def plot_plan(plan: PrunePlan, directory: Path, max_layers: int = 24) -> list[Path]:
    """Write ``esd.png`` (up to ``max_layers`` layers) and ``budgets.png`` into ``directory``."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fitted = [lp for lp in plan.layers if lp.fit is not None and len(lp.fit.singular_values)]
    if fitted:
        step = max(1, math.ceil(len(fitted) / max_layers))
        chosen = fitted[::step][:max_layers]
        cols = min(6, len(chosen))
        rows = math.ceil(len(chosen) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
        for ax, lp in zip(axes.ravel(), chosen):
            plot_esd(ax, lp)
        for ax in axes.ravel()[len(chosen) :]:
            ax.axis("off")
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"Eigenvalue spectra and MP fits ({plan.model_name or 'model'})", fontsize=9)
        fig.tight_layout()
        path = directory / "esd.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(plan.layers)), 3.4))
    x = np.arange(len(plan.layers))
    colors = {"attn": "C0", "mlp": "C1", "other": "C2"}
    ax.bar(x, [lp.unstructured_budget for lp in plan.layers], color=[colors[lp.layer_type] for lp in plan.layers])
    ax.axhline(plan.sparsity, color="k", ls="--", lw=1, label=f"global s={plan.sparsity:.2f}")
    for t, c in colors.items():
        ax.bar([], [], color=c, label=t)
    ax.set_xlabel("layer (module order)")
    ax.set_ylabel("fraction pruned")
    ax.set_title(f"Per-layer budgets: method={plan.method}, pattern={plan.pattern}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / "budgets.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
