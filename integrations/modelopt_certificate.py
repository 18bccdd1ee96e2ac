"""Certify a model sparsified by NVIDIA ModelOpt (``modelopt.torch.sparsity.sparsify``).

ModelOpt turns Linear/Conv layers into dynamic ``Sparse*`` modules holding a weight
mask. :func:`certify_modelopt` exports a *copy* to plain modules (``mts.export``)
and runs :func:`mp_plugin.certificate.certify` against the dense reference, so the
sparsified model keeps its ModelOpt state for further training or export. For a
model sparsified with mode ``"mp"`` the plan is read from its ModelOpt state
(:func:`mp_plugin.integrations.modelopt.plan_of`), so a channel permutation folded
by ``"permute"`` is replayed on the dense reference and per-layer R compares like with like.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mp_plugin.certificate import Certificate, certify

__all__ = ["certify_modelopt"]


def certify_modelopt(
    dense: nn.Module,
    sparse_model: nn.Module,
    batch: Any,
    labels: torch.Tensor | None = None,
    mode: str = "empirical",
    **certify_kwargs: Any,
) -> Certificate:
    """Certify ``sparse_model`` (after ``mts.sparsify``) against ``dense`` without modifying it.

    Args:
        dense: the model before ``mts.sparsify`` (keep a ``copy.deepcopy`` of it).
        sparse_model: the ModelOpt-sparsified model (any mode; wrappers such as DDP are fine).
        batch, labels, mode, **certify_kwargs: as in :func:`mp_plugin.certificate.certify`.
            Without ``plan``/``permutation``, a mode-``"mp"`` model's own plan is used.
    """
    import modelopt.torch.sparsity as mts
    from mp_plugin.integrations import modelopt as mpm

    if "plan" not in certify_kwargs and "permutation" not in certify_kwargs and mpm.has_plan(sparse_model):
        certify_kwargs["plan"] = mpm.plan_of(sparse_model)
    exported = mts.export(copy.deepcopy(sparse_model))
    return certify(dense, exported, batch, labels, mode=mode, **certify_kwargs)
