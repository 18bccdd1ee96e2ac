"""Input-channel permutation for k:n sparsity, folded into the weights.

* :func:`permute_channels` — find couplings in the module graph, search an order
  per coupling, fold it into producer rows, per-channel ops and consumer columns.
* :func:`swap_permutation` — exact channel-swap search (Pool & Yu objective).
* :func:`interleave_permutation` — importance-stratified interleave (spec §2.8).
* :func:`kept_magnitude` — Σ|w| kept by the magnitude k:n mask.

Modules: ``search`` (the searches on one 2-D weight), ``ops`` (which modules act
per channel), ``graph`` (fx coupling closure, recursive fallback to children),
``links`` (joining open couplings of children of an untraceable parent, checked
at run time), ``attention`` (fused-qkv heads), ``fold`` (rewriting the tensors),
``report``, ``record`` (:class:`PermutationRecord`: what was folded, held by the caller
or the plan, never attached to the model) and ``api``.
"""

from __future__ import annotations

from mp_plugin.permute.api import METHODS, PermutationError, align_to_permuted, permute_channels, undo_folds
from mp_plugin.permute.couplings import find_couplings
from mp_plugin.permute.graph import Coupling, GraphFailure
from mp_plugin.permute.record import PermutationRecord, folds_from_data, folds_to_data, resolve_permutation
from mp_plugin.permute.report import PermutationReport, PermutedLayer, SkippedPermutation
from mp_plugin.permute.search import (
    apply_column_permutation,
    channel_importance,
    interleave_permutation,
    kept_magnitude,
    swap_permutation,
)

__all__ = [
    "METHODS",
    "Coupling",
    "GraphFailure",
    "PermutationError",
    "PermutationRecord",
    "PermutationReport",
    "PermutedLayer",
    "align_to_permuted",
    "SkippedPermutation",
    "apply_column_permutation",
    "channel_importance",
    "find_couplings",
    "folds_from_data",
    "folds_to_data",
    "interleave_permutation",
    "kept_magnitude",
    "permute_channels",
    "resolve_permutation",
    "swap_permutation",
    "undo_folds",
]
