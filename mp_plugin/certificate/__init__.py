"""The data-path certificate (ALGORITHM.md §3): which predictions pruning kept — proven, estimated or measured.

* :func:`certify` — per-layer R = A − S, ψ₁ via hooks, ‖Rψ₁(s)‖∞, L_s, per-sample η_s,
  margins, B_T, accuracy-change bound, elastic-net check, sequential multi-layer form,
  Gaussian MP-edge form; three modes, each labelled by what it claims: ``bound``
  (*proven*), ``jacobian`` (*estimated*), ``empirical`` (*measured*); see :mod:`.labels`.
* :func:`restore_gain` — the prune–restore test for one layer.
* :class:`CertificateCallback` — certify every N steps from a plain training loop.
* :func:`certify_sparsifier` — certify a model prepared by a torch.ao.pruning sparsifier.
"""

from __future__ import annotations

from mp_plugin.certificate.auto import certify_auto
from mp_plugin.certificate.callback import CertificateCallback
from mp_plugin.certificate.core import certify
from mp_plugin.certificate.labels import (
    ESTIMATE,
    EXACT,
    HIGH_PROBABILITY,
    LOWER,
    MEASURED,
    MODE_CLAIMS,
    RIGOROUS,
    claim_of,
)
from mp_plugin.certificate.lipschitz import jacobian_estimate, sequential_bound
from mp_plugin.certificate.restore import RestoreResult, restore_gain
from mp_plugin.certificate.result import Certificate, LayerCertificate
from mp_plugin.certificate.sparsifier import certify_sparsifier
from mp_plugin.masks.select import fold_parametrizations

__all__ = [
    "Certificate",
    "CertificateCallback",
    "ESTIMATE",
    "EXACT",
    "HIGH_PROBABILITY",
    "LOWER",
    "LayerCertificate",
    "MEASURED",
    "MODE_CLAIMS",
    "RIGOROUS",
    "RestoreResult",
    "certify",
    "certify_auto",
    "claim_of",
    "certify_sparsifier",
    "fold_parametrizations",
    "jacobian_estimate",
    "restore_gain",
    "sequential_bound",
]
