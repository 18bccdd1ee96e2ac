"""Certificate results: per-layer and per-sample numbers, summary text, JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mp_plugin.certificate.labels import claim_of

__all__ = ["LayerCertificate", "Certificate"]


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclass
class LayerCertificate:
    """The certificate terms of one pruned layer.

    Attributes:
        name: qualified module name; shape: (C_out, C_in·kh·kw).
        norms: ‖R‖²_F, ‖R‖₁, entries changed, exact regulariser drops, mask case.
        rpsi_inf: (|T|,) ‖Rψ₁(s)‖∞ (layer-output units; max over tokens/positions and channels).
        lipschitz: (|T|,) L_s, or None in empirical mode.
        lipschitz_kind: label of L_s (see :mod:`.labels`).
        eta: (|T|,) η_{s} of this layer (logit units), or None when not computed.
        eta_kind: label of ``eta``.
        budget: B_j = (2/|T|) Σ_s η_s (logit units), or None.
        elastic_net: penalty λ₂(‖A‖²−‖S‖²)+λ₁(‖A‖₁−‖S‖₁), budget and ``certified``; None without λ.
        gaussian: the MP-edge high-probability form (:func:`gaussian_mp_budget`), or None.
        ops: downstream ops and their factors (bound mode).
        context: ``"dense network"`` or ``"after pruning the previous layers"`` (sequential).
    """

    name: str
    shape: tuple[int, int]
    norms: dict
    rpsi_inf: np.ndarray
    lipschitz: np.ndarray | None
    lipschitz_kind: str | None
    eta: np.ndarray | None
    eta_kind: str | None
    budget: float | None
    elastic_net: dict | None = None
    gaussian: dict | None = None
    ops: list[str] = field(default_factory=list)
    context: str = "dense network"

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-ready dict; per-sample arrays only when ``per_sample``."""
        d = {
            "name": self.name,
            "shape": list(self.shape),
            "norms": self.norms,
            "rpsi_inf_mean": float(self.rpsi_inf.mean()) if self.rpsi_inf.size else 0.0,
            "rpsi_inf_max": float(self.rpsi_inf.max()) if self.rpsi_inf.size else 0.0,
            "lipschitz_kind": self.lipschitz_kind,
            "lipschitz_max": None if self.lipschitz is None else float(self.lipschitz.max()),
            "eta_kind": self.eta_kind,
            "budget": self.budget,
            "elastic_net": self.elastic_net,
            "gaussian": self.gaussian,
            "ops": self.ops,
            "context": self.context,
        }
        if per_sample:
            d["rpsi_inf"] = self.rpsi_inf
            d["lipschitz"] = self.lipschitz
            d["eta"] = self.eta
        return _clean(d)


@dataclass
class Certificate:
    """Which samples of T keep their prediction after pruning: proven (bound), estimated or measured (see ``claim``).

    Per-sample arrays have length |T|; logit-valued numbers are in logit units.

    Attributes:
        mode: ``"empirical"``, ``"bound"`` or ``"jacobian"``.
        sequential: layers pruned one at a time, each B_j in the already-pruned network.
        eta: (|T|,) η_s, the logit-shift bound/estimate/measurement; ``eta_kind`` labels it.
        margin_pred: (|T|,) dense Δ^pred = z_top − max_{j≠top} z_j (≥ 0).
        margin_true: (|T|,) dense Δ^true = z_c − max_{j≠c} z_j, or None without labels.
        preserved: (|T|,) bool, margin_pred > 2η_s.
        pred_dense / pred_pruned: (|T|,) top-1 classes; labels: (|T|,) or None.
        budget: B_T (bound/jacobian) or B̂ = (2/|T|)Ση_s (empirical); ``budget_kind`` labels it.
        accuracy_change_bound: (1/|T|)#{s: |Δ^true| ≤ 2η_s}, or None without labels.
        measured: agreement, accuracies, mean CE of both models, CE change (``MEASURED``).
        violations: samples marked preserved whose prediction changed (0 whenever the label holds).
        elastic_net: total check Σ B_j < Σ penalty_j, or None without λ.
        gaussian: total MP-edge high-probability budget, or None.
        layers: one :class:`LayerCertificate` per pruned layer, in execution order.
        lambdas: (λ₁, λ₂) or None.
        notes: caveats in words.
    """

    mode: str
    sequential: bool
    eta: np.ndarray
    eta_kind: str
    margin_pred: np.ndarray
    margin_true: np.ndarray | None
    preserved: np.ndarray
    pred_dense: np.ndarray
    pred_pruned: np.ndarray
    labels: np.ndarray | None
    budget: float
    budget_kind: str
    accuracy_change_bound: float | None
    measured: dict
    violations: int
    elastic_net: dict | None
    gaussian: dict | None
    layers: list[LayerCertificate]
    lambdas: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        """|T|."""
        return int(self.eta.shape[0])

    @property
    def preserved_fraction(self) -> float:
        """Fraction of T whose dense margin exceeds 2η_s."""
        return float(self.preserved.mean()) if self.n_samples else 0.0

    @property
    def claim(self) -> str:
        """What "preserved" means here: ``"proven"`` (bound), ``"estimated"`` or ``"measured"`` (empirical)."""
        return claim_of(self.eta_kind)

    @property
    def agreement_change_bound(self) -> float:
        """Upper bound (under ``eta_kind``) on the fraction of T whose prediction changes: 1 − preserved."""
        return 1.0 - self.preserved_fraction

    def to_dict(self, per_sample: bool = True) -> dict:
        """JSON-ready dict; per-sample arrays only when ``per_sample``."""
        d = {
            "mode": self.mode,
            "claim": self.claim,
            "sequential": self.sequential,
            "n_samples": self.n_samples,
            "eta_kind": self.eta_kind,
            "budget": self.budget,
            "budget_kind": self.budget_kind,
            "preserved_fraction": self.preserved_fraction,
            "agreement_change_bound": self.agreement_change_bound,
            "accuracy_change_bound": self.accuracy_change_bound,
            "measured": self.measured,
            "violations": self.violations,
            "elastic_net": self.elastic_net,
            "gaussian": self.gaussian,
            "lambdas": None if self.lambdas is None else list(self.lambdas),
            "notes": self.notes,
            "layers": [layer.to_dict(per_sample) for layer in self.layers],
        }
        if per_sample:
            d.update(
                eta=self.eta,
                margin_pred=self.margin_pred,
                margin_true=self.margin_true,
                preserved=self.preserved,
                pred_dense=self.pred_dense,
                pred_pruned=self.pred_pruned,
                labels=self.labels,
            )
        return _clean(d)

    def save_json(self, path: str | Path, per_sample: bool = True) -> Path:
        """Write :meth:`to_dict` to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(per_sample), indent=1))
        return path

    def summary(self, max_layers: int = 12) -> str:
        """Human-readable report; every number names its kind."""
        m = self.measured
        lines = [
            f"certificate: {self.claim.upper()} (mode={self.mode}{', sequential' if self.sequential else ''}), "
            f"|T|={self.n_samples}, {len(self.layers)} pruned layer(s)",
            f"  η_s: {self.eta_kind}; mean {self.eta.mean():.4g}, max {self.eta.max():.4g} (logits)",
            f"  B_T = {self.budget:.4g}  [{self.budget_kind}]",
            f"  preserved (margin > 2η), {self.claim}: {self.preserved.sum()}/{self.n_samples} = "
            f"{self.preserved_fraction:.3f}  [{self.eta_kind}]",
            f"  prediction-change bound: {self.agreement_change_bound:.3f}",
        ]
        if self.accuracy_change_bound is not None:
            lines.append(f"  accuracy-change bound: {self.accuracy_change_bound:.3f}  [{self.eta_kind}]")
        line = f"  measured: agreement {m['agreement']:.3f}"
        if m.get("accuracy_dense") is not None:
            line += (
                f", accuracy {m['accuracy_dense']:.3f} → {m['accuracy_pruned']:.3f}, "
                f"CE {m['ce_dense']:.4g} → {m['ce_pruned']:.4g}"
            )
        lines.append(line + f"; preserved-but-changed: {self.violations}")
        if self.elastic_net is not None:
            e = self.elastic_net
            lines.append(
                f"  elastic net (λ₁={self.lambdas[0]:g}, λ₂={self.lambdas[1]:g}): budget {e['budget']:.4g} vs "
                f"penalty drop {e['penalty']:.4g} → {e['verdict']}"
            )
        if self.gaussian is not None and self.gaussian.get("value") is not None:
            lines.append(f"  Gaussian MP-edge form (δ={self.gaussian['delta']:g}): {self.gaussian['value']:.4g}")
        if self.layers:
            lines.append(f"  {'layer':<40} {'‖R‖₁':>10} {'mean‖Rψ‖∞':>11} {'max L_s':>10} {'B_j':>10}")
            for layer in self.layers[:max_layers]:
                lmax = "-" if layer.lipschitz is None else f"{layer.lipschitz.max():.4g}"
                bj = "-" if layer.budget is None else f"{layer.budget:.4g}"
                lines.append(
                    f"  {layer.name[-40:]:<40} {layer.norms['r_l1']:>10.4g} {layer.rpsi_inf.mean():>11.4g} "
                    f"{lmax:>10} {bj:>10}"
                )
            if len(self.layers) > max_layers:
                lines.append(f"  … {len(self.layers) - max_layers} more layers")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
