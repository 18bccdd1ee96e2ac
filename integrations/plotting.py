"""Plots of a plan (per-layer ESDs with the fitted MP law, budgets per layer) and of a certificate.

* ``esd.png`` — for each shown layer, the eigenvalues λ = s²/n of WᵀW/n on log–log axes
  (as WeightWatcher draws them), the fitted MP density, the fitted edge (the TW-corrected
  threshold σ₊²/n, dashed) and the spikes above it (red ticks). Every layer is shown up to
  ``max_layers``; beyond that an evenly spaced subset, and the title says which.
* ``budgets.png`` — one named bar per layer (fraction pruned by the budget), coloured by
  layer type (attn / mlp / other, the legend uses the same colours), the global target
  dashed, and the sparsity after pattern rounding where it differs.

Needs matplotlib (``pip install 'mp-plugin[plot]'``); it is imported only here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mp_plugin.errors import MPPluginError
from mp_plugin.spectrum import mp_density, mp_edges

if TYPE_CHECKING:
    from mp_plugin.certificate.result import CertificateResult
    from mp_plugin.planning.build import PrunePlan

__all__ = ["plot_plan", "plot_certificate", "plot_esd", "esd_figure", "budget_figure", "TYPE_COLORS", "shown_layers"]

TYPE_COLORS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "other": "#2ca02c"}
SPIKE_COLOR = "#d62728"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MPPluginError("plotting needs matplotlib: pip install 'mp-plugin[plot]'") from exc
    return plt


def _short(name: str, width: int) -> str:
    """``name`` cut in the middle to at most ``width`` characters."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[-(keep - keep // 2) :]


def plot_esd(ax: Any, lp: Any) -> None:
    """Draw one layer's ESD (λ = s²/n) on log–log axes with the fitted MP density, edge and spikes."""
    f = lp.fit
    n = max(f.shape)
    lam = np.asarray(f.singular_values, dtype=np.float64) ** 2 / n
    lam = lam[lam > 0]
    if lam.size == 0:
        ax.set_title(_short(lp.name, 40) + "\n(all singular values 0)", fontsize=7)
        return
    lo, hi = float(lam.min()), float(lam.max())
    if hi <= lo:
        lo, hi = lo * 0.9, hi * 1.1
    bins = np.geomspace(lo, hi * 1.0001, int(np.clip(lam.size // 3, 12, 60)))
    ax.hist(lam, bins=bins, density=True, color="#9ab", alpha=0.85, label="ESD (λ = s²/n)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    spikes = lam[lam > f.threshold] if f.threshold > 0 else lam[:0]
    if f.sigma > 0:
        edge_lo, edge_hi = mp_edges(f.gamma, f.sigma**2)
        x = np.geomspace(max(edge_lo, lo * 0.5, 1e-300), edge_hi, 400)
        bulk_share = 1.0 - spikes.size / lam.size
        dens = mp_density(x, f.gamma, f.sigma**2) * bulk_share
        ok = dens > 0
        ax.plot(x[ok], dens[ok], color="k", lw=1.2, label="MP fit")
        ax.axvline(f.threshold, color=SPIKE_COLOR, ls="--", lw=1, label="fitted edge σ₊²/n")
    if spikes.size:
        ymin = ax.get_ylim()[0]
        ax.plot(spikes, np.full(spikes.size, ymin), "|", color=SPIKE_COLOR, ms=12, mew=1.5, label="spikes")
        ax.set_ylim(bottom=ymin)
    ax.set_title(f"{_short(lp.name, 40)}\n{f.n_spikes} spikes, μ={f.fit_error:.3f}", fontsize=7)
    from matplotlib.ticker import NullFormatter

    for axis in (ax.xaxis, ax.yaxis):  # minor log labels overlap on narrow ranges
        axis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=6, which="both")


def shown_layers(plan: PrunePlan, max_layers: int) -> tuple[list[Any], int]:
    """``(layers drawn in esd.png, number of fitted layers)``: all, or ``max_layers`` evenly spaced."""
    fitted = [lp for lp in plan.layers if lp.fit is not None and len(lp.fit.singular_values)]
    if len(fitted) <= max_layers:
        return fitted, len(fitted)
    idx = np.unique(np.linspace(0, len(fitted) - 1, max_layers).round().astype(int))
    return [fitted[i] for i in idx], len(fitted)


def esd_figure(plan: PrunePlan, max_layers: int = 36) -> Any:
    """The ESD grid as a matplotlib Figure (None when no layer has a fit)."""
    plt = _pyplot()
    chosen, total = shown_layers(plan, max_layers)
    if not chosen:
        return None
    cols = min(6, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.5 * rows + 0.6), squeeze=False)
    for ax, lp in zip(axes.ravel(), chosen):
        plot_esd(ax, lp)
    for ax in axes.ravel()[len(chosen) :]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.ravel()[: len(chosen)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels.setdefault(lab, lab)
    fig.legend(list(handles.values()), list(labels.values()), loc="upper right", fontsize=7, ncol=4)
    which = (
        f"all {total} fitted layers"
        if len(chosen) == total
        else f"{len(chosen)} of {total} fitted layers, evenly spaced in module order (every layer is in plan.json)"
    )
    fig.suptitle(f"Eigenvalue spectra and MP fits, log–log ({plan.model_name or 'model'}): {which}", fontsize=9, x=0.01,
                 ha="left")  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.5 * rows + 0.6)))
    return fig


def budget_figure(plan: PrunePlan) -> Any:
    """The per-layer budget bar chart as a matplotlib Figure: named bars, colours by layer type."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    layers = plan.layers
    names = [_short(lp.name, 38) for lp in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(layers) + 1.5), 5.2))
    x = np.arange(len(layers))
    colors = [TYPE_COLORS.get(lp.layer_type, TYPE_COLORS["other"]) for lp in layers]
    ax.bar(x, [lp.unstructured_budget for lp in layers], color=colors)
    handles = [
        Patch(facecolor=TYPE_COLORS[t], label=t) for t in TYPE_COLORS if any(lp.layer_type == t for lp in layers)
    ]
    line = ax.axhline(plan.sparsity, color="k", ls="--", lw=1, label=f"global s = {plan.sparsity:.2f}")
    handles.append(line)
    rounded = [i for i, lp in enumerate(layers) if abs(lp.sparsity - lp.unstructured_budget) > 1e-9]
    if rounded:
        marks = ax.scatter(rounded, [layers[i].sparsity for i in rounded], marker="_", s=120, color="k", zorder=3,
                           label="after pattern rounding")  # fmt: skip
        handles.append(marks)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=max(4, min(7, int(300 / max(len(layers), 1)))))
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("fraction of the layer's weights pruned")
    ax.set_title(f"Per-layer budgets ({plan.model_name or 'model'}): budget={plan.method}, pattern={plan.pattern}",
                 fontsize=9)  # fmt: skip
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    return fig


def plot_plan(plan: PrunePlan, directory: str | Path, max_layers: int = 36) -> list[Path]:
    """Write ``esd.png`` (all layers up to ``max_layers``) and ``budgets.png`` into ``directory``; return their paths."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fig = esd_figure(plan, max_layers)
    if fig is not None:
        path = directory / "esd.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig = budget_figure(plan)
    path = directory / "budgets.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def plot_certificate(result: CertificateResult, path: str | Path) -> Path:
    """Scatter of a certificate's dense margin against 2η_s per sample; points above the diagonal are preserved."""
    plt = _pyplot()
    path = Path(path)
    if not path.suffix:  # matplotlib would add ".png" itself: return the name it writes
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    x, y = 2 * result.eta, result.margin_pred
    changed = result.pred_dense != result.pred_pruned
    ax.scatter(x[~changed], y[~changed], s=12, label="prediction kept", alpha=0.7)
    ax.scatter(x[changed], y[changed], s=18, marker="x", color="C3", label="prediction changed")
    top = float(max(x.max(), y.max(), 1e-12)) * 1.05
    ax.plot([0, top], [0, top], "k--", lw=1, label="margin = 2η")
    ax.set_xlabel("2η_s (logits)")
    ax.set_ylabel("dense margin Δ^pred (logits)")
    ax.set_title(
        f"{result.claim} ({result.mode} mode): {result.preserved_fraction:.1%} preserved [{result.eta_kind}]",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
