"""Opt-in SEB variants on other per-layer spectral signals (the paper's ``"seb"`` rule is unchanged).

The paper's SEB z-scores the fitted edge σ₊ across layers. For a noise matrix
with entry scale σ, σ₊ ≈ σ(√N + √M), so across layers of different shapes the
z-score mostly encodes *shape* (a 1536×384 MLP matrix has a larger σ₊ than a
384×384 attention matrix with the same entries). These variants feed SEB's rule
w_ℓ = max(0.1, 1 + β·d(s)·z_ℓ) with a shape-free signal instead:

=====================  =====================================================  ==============================
method                 signal                                                 high signal means
=====================  =====================================================  ==============================
``seb-sigma``          σ̂, the fitted bulk entry scale (σ₊ / (√N+√M) up to     larger noise scale → prune more
                       the TW correction; weight units)
``seb-bulk-energy``    1 − Σ_spikes s² / Σ s² (fraction of energy in the bulk) more noise-like → prune more
``seb-bulk-fraction``  fraction of singular values below σ₊                   more noise-like → prune more
=====================  =====================================================  ==============================

``SEBConfig.direction`` and the regime table apply as for ``"seb"``. Importing
this module registers the methods in :data:`mp_plugin.budget.rules.BUDGET_METHODS`.
``benchmarks/accuracy.py`` measures them against ``"seb"`` and global magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mp_plugin.budget.rules import SEBConfig, register_budget_method, seb_layer_weights
from mp_plugin.spectrum import SpectralFit

__all__ = ["SIGNALS", "signal_values"]

SIGNALS: dict[str, Callable[[SpectralFit], float]] = {
    "sigma": lambda f: f.sigma,
    "bulk-energy": lambda f: 1.0 - f.spike_energy_fraction,
    "bulk-fraction": lambda f: f.bulk_fraction,
}


def signal_values(fits: Sequence[SpectralFit | None], signal: str) -> np.ndarray:
    """Per-layer values of ``signal`` (a key of :data:`SIGNALS`); NaN where a fit is missing or degenerate."""
    fn = SIGNALS[signal]
    out = [fn(f) if f is not None and not f.degenerate else float("nan") for f in fits]
    return np.asarray(out, dtype=np.float64)


def _method(signal: str) -> Callable:
    def weights(
        fits: Sequence[SpectralFit | None], layer_types: Sequence[str], sparsity: float, config: SEBConfig | None
    ) -> tuple[np.ndarray, np.ndarray]:
        return seb_layer_weights(signal_values(fits, signal), layer_types, sparsity, config or SEBConfig())

    return weights


for _name in SIGNALS:
    register_budget_method(f"seb-{_name}", _method(_name), doc=f"SEB rule on the shape-free signal {_name!r}")
