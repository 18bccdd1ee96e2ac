"""How much each certificate number can be trusted: the labels every output carries.

* ``RIGOROUS`` — a mathematical upper bound (``mode="bound"``), up to float rounding.
* ``ESTIMATE`` — a local estimate, not a bound (``mode="jacobian"``, or layers
  certified independently in the dense network).
* ``EXACT`` — measured for the realised pruning on this batch (``mode="empirical"``).
* ``LOWER`` — a lower bound on every valid B_T (the empirical B̂).
* ``HIGH_PROBABILITY`` — holds with probability ≥ 1 − δ if R were iid Gaussian and
  independent of the inputs; a heuristic signal for a magnitude mask.
* ``MEASURED`` — an observed quantity (accuracy, CE, agreement), no claim attached.
"""

from __future__ import annotations

__all__ = ["RIGOROUS", "ESTIMATE", "EXACT", "LOWER", "HIGH_PROBABILITY", "MEASURED", "MODES"]

RIGOROUS = "rigorous bound"
ESTIMATE = "estimated, not certified"
EXACT = "exact for realised pruning"
LOWER = "lower bound on any valid B_T"
HIGH_PROBABILITY = "high-probability bound if R were iid Gaussian (heuristic for masks)"
MEASURED = "measured"

MODES = ("empirical", "bound", "jacobian")
