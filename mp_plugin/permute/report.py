"""What :func:`mp_plugin.permute_channels` did: permuted and skipped layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["PermutedLayer", "SkippedPermutation", "PermutationReport"]


@dataclass
class PermutedLayer:
    """One consumer layer whose input channels were permuted.

    Attributes:
        name: consumer module name (the layer whose k:n groups the permutation serves).
        site: ``"graph"`` (fx coupling) or ``"attention"`` (V rows ↔ proj columns).
        partners: producers / per-channel modules permuted with it.
        kept_before / kept_after: Σ|w| kept by the magnitude k:n mask, identity vs permuted.
        seconds: search time for the coupling.
    """

    name: str
    site: str
    partners: list[str]
    kept_before: float
    kept_after: float
    seconds: float

    @property
    def gain(self) -> float:
        """Relative gain in kept magnitude, kept_after / kept_before − 1."""
        return self.kept_after / self.kept_before - 1.0 if self.kept_before else 0.0


@dataclass
class SkippedPermutation:
    """A layer left unpermuted, and why."""

    name: str
    reason: str


@dataclass
class PermutationReport:
    """Result of one :func:`permute_channels` call.

    Attributes:
        pattern: the k:n pattern searched for, e.g. ``"2:4"``.
        method: ``"swap"`` or ``"interleave"``.
        permuted / skipped: per-layer records.
        notes: tracing notes (modules that did not trace as a whole).
        verified: True when the whole model's output was checked on an example
            input after folding, None when no input was available.
        max_abs_diff: that check's max |Δ output|.
    """

    pattern: str
    method: str
    permuted: list[PermutedLayer] = field(default_factory=list)
    skipped: list[SkippedPermutation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: bool | None = None
    max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"channel permutation {self.pattern} ({self.method}): {len(self.permuted)} permuted, "
            f"{len(self.skipped)} skipped; verified={self.verified}"
            + (f" (max |Δ| = {self.max_abs_diff:.2e})" if self.max_abs_diff is not None else "")
        ]
        for p in self.permuted:
            lines.append(f"  + {p.name:<48} {p.site:<9} kept {p.kept_before:.4g} → {p.kept_after:.4g} ({p.gain:+.2%})")
        for s in self.skipped:
            lines.append(f"  - {s.name:<48} {s.reason}")
        return "\n".join(lines)
