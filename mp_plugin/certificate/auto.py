"""Certify with the strongest mode that can run, saying so when it falls back.

``certify_auto`` tries the rigorous bound (``mode="bound"``, sequential, so the
result is *proven*); where the bound cannot run (an operation it cannot bound
such as LayerNorm, GELU, softmax or attention, shared weights, a channel
permutation it cannot align) it reports that in one line and falls back to the
*measured* certificate (``mode="empirical"``). The returned certificate carries
its claim (``cert.claim``), and the reason for any fallback is in its notes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mp_plugin.certificate.core import certify
from mp_plugin.certificate.labels import MODE_CLAIMS
from mp_plugin.certificate.result import Certificate
from mp_plugin.errors import NotCertifiable

__all__ = ["certify_auto"]


def certify_auto(
    dense: nn.Module,
    pruned: nn.Module,
    batch: torch.Tensor,
    labels: torch.Tensor | None = None,
    mode: str = "auto",
    log: Callable[[str], None] = print,
    show_progress: bool = False,
    **kwargs: object,
) -> Certificate:
    """Certify ``pruned`` against ``dense`` on ``batch`` in ``mode``, falling back to ``"empirical"``.

    Args:
        dense / pruned / batch / labels: as for :func:`~mp_plugin.certificate.certify`.
        mode: ``"auto"`` (try ``"bound"``), ``"bound"``, ``"jacobian"`` or ``"empirical"``.
            Bound mode runs sequentially (one layer after another), the form whose
            multi-layer result is a rigorous bound.
        log: receives the one-line fallback message.
        show_progress: tqdm bars inside :func:`certify`.
        kwargs: passed on to :func:`certify` (``lambdas``, ``layers``, ``precision``, …).

    Returns:
        The certificate; ``cert.claim`` says whether it is proven, estimated or measured.
    """
    want = "bound" if mode == "auto" else mode
    if want == "bound":
        kwargs = {**kwargs, "sequential": True}
    if want != "empirical":
        try:
            return certify(dense, pruned, batch, labels, mode=want, show_progress=show_progress, **kwargs)
        except NotCertifiable as exc:
            reason = " ".join(str(exc).split())
            log(
                f"the {want} certificate ({MODE_CLAIMS[want]}) cannot run on this model: {reason}; "
                "falling back to the measured (empirical) certificate"
            )
            kwargs = {k: v for k, v in kwargs.items() if k != "sequential"}
            cert = certify(dense, pruned, batch, labels, mode="empirical", show_progress=show_progress, **kwargs)
            cert.notes.append(f"fallback from {want} mode: {reason}")
            return cert
    return certify(dense, pruned, batch, labels, mode="empirical", show_progress=show_progress, **kwargs)
