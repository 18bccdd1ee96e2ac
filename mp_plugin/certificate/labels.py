"""How much each certificate number can be trusted: the labels every output carries.

* ``RIGOROUS`` — a mathematical upper bound (``mode="bound"``) in exact arithmetic; the
  preserved test adds an allowance for the rounding of the computed logits
  (:mod:`mp_plugin.certificate.rigor`).
* ``ESTIMATE`` — a local estimate, not a bound (``mode="jacobian"``, or layers
  certified independently in the dense network).
* ``EXACT`` — measured for the realised pruning on this batch (``mode="empirical"``).
* ``LOWER`` — a lower bound on every valid B_T (the empirical B̂).
* ``HIGH_PROBABILITY`` — holds with probability ≥ 1 − δ if R were iid Gaussian and
  independent of the inputs; a heuristic signal for a magnitude mask.
* ``MEASURED`` — an observed quantity (accuracy, CE, agreement), no claim attached.

What a certificate's "preserved" set means, in one word (:func:`claim_of`, shown in
every summary, JSON and plot): **proven** (η_s is a rigorous bound: ``mode="bound"``),
**estimated** (``mode="jacobian"``, or bound mode without ``sequential`` on several
layers) or **measured** (``mode="empirical"``: the realised shift on the same samples,
so "preserved ⇒ same prediction" holds by construction, not by proof).
"""

from __future__ import annotations

__all__ = [
    "RIGOROUS",
    "ESTIMATE",
    "EXACT",
    "LOWER",
    "HIGH_PROBABILITY",
    "MEASURED",
    "MODES",
    "PROVEN",
    "ESTIMATED",
    "MEASURED_CLAIM",
    "MODE_CLAIMS",
    "claim_of",
]

RIGOROUS = "rigorous bound"
ESTIMATE = "estimated, not certified"
EXACT = "exact for realised pruning"
LOWER = "lower bound on any valid B_T"
HIGH_PROBABILITY = "high-probability bound if R were iid Gaussian (heuristic for masks)"
MEASURED = "measured"

MODES = ("empirical", "bound", "jacobian")

PROVEN = "proven"
ESTIMATED = "estimated"
MEASURED_CLAIM = "measured"
# what each mode claims at best (bound mode drops to "estimated" without sequential on several layers)
MODE_CLAIMS = {"bound": PROVEN, "jacobian": ESTIMATED, "empirical": MEASURED_CLAIM}


def claim_of(eta_kind: str) -> str:
    """``"proven"``, ``"estimated"`` or ``"measured"`` for a certificate whose η_s has label ``eta_kind``."""
    if eta_kind == RIGOROUS:
        return PROVEN
    if eta_kind == EXACT:
        return MEASURED_CLAIM
    return ESTIMATED
