"""The Gaussian MP-edge form of the data-path budget (ALGORITHM.md §1.4(iv)).

If R ∈ ℝ^{n×m} had iid N(0, g/n) entries independent of the inputs v_s, then with
probability ≥ 1 − δ

    B_T(R) ≤ (2σ₊,R/(1+√(m/n))) · √((2/n)·log(2n|T|/δ)) · (1/|T|) Σ_s L_s‖v_s‖₂,

σ₊,R = √g(1+√(m/n)), i.e. an entry std σ₊,R/(√n+√m). For token or conv inputs
each sample has P rows v_{s,t} (tokens / patches); the union bound then runs
over n·P output coordinates and ‖v_s‖₂ becomes max_t ‖v_{s,t}‖₂. σ₊,R is the
BEMA-fitted edge of R itself. A magnitude mask's R is not Gaussian, so this is
a heuristic signal, labelled as such.
"""

from __future__ import annotations

import math

import torch

from mp_plugin.certificate.labels import HIGH_PROBABILITY
from mp_plugin.errors import MPPluginError
from mp_plugin.spectrum import fit_marchenko_pastur

__all__ = ["gaussian_mp_budget"]


def gaussian_mp_budget(
    removed: torch.Tensor, row_norms: torch.Tensor, rows_per_sample: int, lipschitz: torch.Tensor, delta: float
) -> dict:
    """The high-probability budget of one layer.

    Args:
        removed: R (C_out, C_in[, kh, kw]); read as n × m with n = C_out.
        row_norms: (|T|,) max_t ‖v_{s,t}‖₂ per sample (input units).
        rows_per_sample: P, input rows (tokens/positions) per sample.
        lipschitz: (|T|,) L_s.
        delta: failure probability δ ∈ (0, 1).

    Returns:
        dict with ``value`` (logit units, or None if σ₊ cannot be fitted), ``sigma_plus``,
        ``entry_std``, ``delta``, ``kind``, ``note``.
    """
    n = int(removed.shape[0])
    m = int(removed[0].numel())
    out = {"value": None, "sigma_plus": None, "entry_std": None, "delta": delta, "kind": HIGH_PROBABILITY, "note": ""}
    if not bool(removed.any()):
        out.update(value=0.0, sigma_plus=0.0, entry_std=0.0, note="R = 0")
        return out
    try:
        fit = fit_marchenko_pastur(removed.detach().reshape(n, m).float())
    except MPPluginError as exc:
        out["note"] = f"σ₊ of R not fitted: {exc}"
        return out
    entry_std = fit.sigma_plus / (math.sqrt(n) + math.sqrt(m))
    t = int(row_norms.shape[0])
    tail = math.sqrt(2.0 * math.log(2.0 * n * rows_per_sample * t / delta))
    value = 2.0 * entry_std * tail * float((lipschitz.double() * row_norms.double()).mean())
    out.update(value=value, sigma_plus=float(fit.sigma_plus), entry_std=entry_std)
    return out
