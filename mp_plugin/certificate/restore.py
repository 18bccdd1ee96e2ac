"""The prune–restore test (ALGORITHM.md §3): is restoring Q worth it?

Split a layer's dense weight A = S + Q + P with disjoint supports: S stays, Q is
restored, P is finally removed. With B_T(X) = (2/|T|) Σ_s L_s‖Xψ₁(s)‖∞,

* the final pruning is certified iff B_T(P) < λ₂‖P‖²_F + λ₁‖P‖₁;
* restoring Q improves the certified decrease iff B_T(Q+P) − B_T(P) > λ₂‖Q‖²_F + λ₁‖Q‖₁.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call

from mp_plugin.certificate.labels import RIGOROUS
from mp_plugin.errors import CertificateInputError

__all__ = ["RestoreResult", "restore_gain"]


@dataclass
class RestoreResult:
    """Outcome of :func:`restore_gain` (budgets and penalties in logit/loss units).

    Attributes:
        budget_qp: B_T(Q+P), removing both; budget_p: B_T(P), removing P only.
        penalty_q / penalty_p: λ₂‖·‖²_F + λ₁‖·‖₁ of Q and of P.
        gain: (B_T(Q+P) − B_T(P)) − penalty_q; > 0 means restoring Q is worth it.
        restore_improves: gain > 0.
        final_certified: B_T(P) < penalty_p.
        kind: label of the budgets (that of the L_s given).
    """

    budget_qp: float
    budget_p: float
    penalty_q: float
    penalty_p: float
    gain: float
    restore_improves: bool
    final_certified: bool
    kind: str

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _component(a: torch.Tensor, part: torch.Tensor, name: str) -> torch.Tensor:
    if part.dtype == torch.bool:
        return torch.where(part, a, torch.zeros_like(a))
    if part.shape != a.shape:
        raise CertificateInputError(f"{name} has shape {tuple(part.shape)}, the layer weight {tuple(a.shape)}")
    return part.to(a)


def _budget(x: torch.Tensor, inputs: torch.Tensor, lipschitz: torch.Tensor, layer: nn.Module | None) -> float:
    if layer is None:
        if inputs.shape[-1] != x[0].numel():
            raise CertificateInputError(f"inputs have width {inputs.shape[-1]}, the weight reads {x[0].numel()}")
        out = inputs @ x.reshape(x.shape[0], -1).T
    else:
        params = {"weight": x}
        if getattr(layer, "bias", None) is not None:
            params["bias"] = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        out = functional_call(layer, params, (inputs,))
    return float(2 * (lipschitz * out.abs().flatten(1).amax(1)).mean())


def restore_gain(
    dense_layer_weight: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    P: torch.Tensor,
    inputs: torch.Tensor,
    lipschitz: float | torch.Tensor,
    lambdas: tuple[float, float],
    layer: nn.Module | None = None,
    kind: str = RIGOROUS,
) -> RestoreResult:
    """Decide whether restoring Q (inside a fixed sparse pattern) improves the certificate.

    Args:
        dense_layer_weight: A, (C_out, C_in[, kh, kw]).
        S, Q, P: kept / restored / removed parts: weight-valued tensors with A = S + Q + P and
            disjoint supports, or boolean masks partitioning A's entries.
        inputs: ψ₁ on T: (|T|, …, C_in) for a Linear (tokens allowed), or the layer's input
            (|T|, C_in, H, W) when ``layer`` (the conv module) is given.
        lipschitz: L_s, a scalar or (|T|,) (e.g. ``Certificate.layers[i].lipschitz``).
        lambdas: (λ₁, λ₂).
        layer: the module, needed for convs (padding/stride are taken from it).
        kind: the label of the given L_s (``RIGOROUS`` for bound-mode constants).
    """
    a = dense_layer_weight.detach().double()
    parts = [t.detach() for t in (S, Q, P)]
    supports = [t if t.dtype == torch.bool else t != 0 for t in parts]
    if any(bool((x & y).any()) for i, x in enumerate(supports) for y in supports[i + 1 :]):
        raise CertificateInputError("S, Q and P must have disjoint supports")
    s, q, p = (_component(a, t, nm) for t, nm in zip(parts, ("S", "Q", "P")))
    if not torch.allclose(s + q + p, a, rtol=0, atol=1e-12 * max(1.0, float(a.abs().max()))):
        raise CertificateInputError("S + Q + P must equal the dense weight (masks must cover every entry)")
    lam1, lam2 = (float(v) for v in lambdas)
    x = inputs.detach().double()
    lip = torch.as_tensor(lipschitz, dtype=torch.float64, device=x.device)
    if lip.ndim and lip.shape[0] != x.shape[0]:
        raise CertificateInputError(f"lipschitz has {lip.shape[0]} values for {x.shape[0]} samples")
    b_qp = _budget(q + p, x, lip, layer)
    b_p = _budget(p, x, lip, layer)
    pen_q = lam2 * float((q * q).sum()) + lam1 * float(q.abs().sum())
    pen_p = lam2 * float((p * p).sum()) + lam1 * float(p.abs().sum())
    gain = (b_qp - b_p) - pen_q
    return RestoreResult(b_qp, b_p, pen_q, pen_p, gain, gain > 0, b_p < pen_p, kind)
