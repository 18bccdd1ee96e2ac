"""Certify a model prepared by a ``torch.ao.pruning`` sparsifier without touching it.

A sparsifier registers ``FakeSparsity`` parametrizations: the module's ``weight`` is
``original * mask`` while ``parametrizations.weight.original`` keeps the dense values.
Folding them on two copies gives the dense model (originals) and the pruned one
(masked), so no separate dense snapshot is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mp_plugin.certificate.core import certify
from mp_plugin.certificate.inputs import Batch
from mp_plugin.certificate.result import Certificate
from mp_plugin.masks.select import fold_parametrizations

__all__ = ["certify_sparsifier"]


def certify_sparsifier(
    sparsifier: Any,
    batch: Batch,
    labels: torch.Tensor | None = None,
    mode: str = "empirical",
    dense: nn.Module | None = None,
    **certify_kwargs: Any,
) -> Certificate:
    """Certify the current masks of a ``torch.ao.pruning.BaseSparsifier`` (or its prepared model).

    Args:
        sparsifier: a sparsifier after ``prepare``/``step`` (its ``.model`` is read), or the
            prepared model itself.
        batch, labels, mode, **certify_kwargs: as in :func:`certify`.
        dense: the reference model; default: the parametrizations' unmasked originals.

    The prepared model is not modified (parametrizations are folded on copies).
    """
    model = getattr(sparsifier, "model", sparsifier)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a sparsifier with .model or an nn.Module, got {type(sparsifier).__name__}")
    reference = fold_parametrizations(model, original=True) if dense is None else dense
    return certify(reference, fold_parametrizations(model), batch, labels, mode=mode, **certify_kwargs)
