"""Deployable sparsity patterns: dense, unstructured, and k:n along the input axis.

``Pattern.parse("2:4")`` gives k=2 kept out of every n=4 consecutive inputs
(sparsity 1 − k/n). 2:4 is the only k:n pattern with a hardware path on NVIDIA
Ampere/Hopper (cuSPARSELt, TensorRT); 4:8, 6:12, 8:16 and 12:16 are
accuracy-only patterns (no kernel runs them), and :attr:`Pattern.hardware`
says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mp_plugin.errors import PatternError
from mp_plugin.layers.layout import kn_eligible

__all__ = ["Pattern", "DEPLOYABLE_KN", "round_budget_to_pattern"]

DEPLOYABLE_KN = ("2:4", "4:8", "6:12", "8:16", "12:16")
_KN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    Attributes:
        kind: ``"dense"``, ``"unstructured"`` or ``"kn"``.
        k: kept weights per group (k:n only).
        n: group size along the input axis (k:n only), 2 ≤ n ≤ 16.
    """

    kind: str
    k: int = 0
    n: int = 0

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """Parse ``"dense"``, ``"unstructured"`` or ``"k:n"`` (k < n ≤ 16)."""
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise PatternError(
                f"pattern must be a string ('dense', 'unstructured' or 'k:n' such as '2:4'), got {text!r}"
            )
        t = text.strip().lower()
        if t in ("dense", "none"):
            return cls("dense")
        if t in ("unstructured", "global"):
            return cls("unstructured")
        m = _KN.match(t)
        if not m:
            raise PatternError(f"unknown pattern {text!r}: use 'dense', 'unstructured' or 'k:n' such as '2:4'")
        k, n = int(m.group(1)), int(m.group(2))
        if n > 16:
            raise PatternError(f"{k}:{n}: group size n must be ≤ 16")
        if not 1 <= k < n:
            raise PatternError(f"{k}:{n}: need 1 ≤ k < n")
        return cls("kn", k, n)

    @property
    def is_kn(self) -> bool:
        """True for k:n patterns."""
        return self.kind == "kn"

    @property
    def sparsity(self) -> float | None:
        """Fraction of zeros a k:n pattern fixes (None for unstructured, 0 for dense)."""
        if self.kind == "dense":
            return 0.0
        return 1.0 - self.k / self.n if self.is_kn else None

    @property
    def hardware(self) -> bool:
        """True only for 2:4, the one k:n pattern with sparse tensor-core kernels."""
        return self.is_kn and (self.k, self.n) == (2, 4)

    def eligible(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of ``shape`` can take this pattern.

        ``shape`` is the weight's own shape, (C_out, C_in) or (C_out, C_in/groups, *kernel):
        k:n groups run along the input channels (``mp_plugin.layers.layout``), so k:n needs
        ``shape[1] % n == 0``. Dense and unstructured fit every shape.
        """
        return not self.is_kn or kn_eligible(shape, self.n)

    def __str__(self) -> str:
        return f"{self.k}:{self.n}" if self.is_kn else self.kind


def round_budget_to_pattern(
    budget: float, shape: tuple[int, ...], candidates: tuple[str, ...] = ("dense", "12:16", "2:4")
) -> Pattern:
    """Round an unstructured per-layer budget to the nearest deployable pattern.

    The candidate whose fixed sparsity is closest to ``budget`` wins among those
    eligible for ``shape`` (the weight's own shape, see :meth:`Pattern.eligible`);
    ``dense`` is always eligible.
    """
    best = Pattern("dense")
    best_gap = abs(budget)
    for cand in candidates:
        pat = Pattern.parse(cand)
        if pat.sparsity is None or not pat.eligible(shape):
            continue
        gap = abs(budget - pat.sparsity)
        if gap < best_gap - 1e-12:
            best, best_gap = pat, gap
    return best
