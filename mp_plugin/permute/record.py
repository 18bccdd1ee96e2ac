"""The fold record of a permuted model as plain JSON-ready data (for checkpoints).

``permute_channels`` leaves ``model._mp_permutation_folds``: the list of
(:class:`~mp_plugin.permute.graph.Coupling` or
:class:`~mp_plugin.permute.attention.AttentionSite`, permutation) it folded, in
order. :func:`folds_to_data` turns it into lists/dicts/ints only (safe for
``torch.load(weights_only=True)`` and JSON); :func:`folds_from_data` is the inverse.
:func:`permutation_record` / :func:`restore_permutation_record` carry a model's
whole record (``_mp_permutations`` + folds) through any checkpoint format.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from mp_plugin.errors import MPPluginError
from mp_plugin.permute.attention import AttentionSite
from mp_plugin.permute.graph import Coupling

__all__ = ["folds_to_data", "folds_from_data", "permutation_record", "restore_permutation_record"]


def folds_to_data(folds: list[tuple[Coupling | AttentionSite, torch.Tensor]]) -> list[dict[str, Any]]:
    """``[{"kind": "coupling"|"attention", "site": {...}, "perm": [int, ...]}, ...]``."""
    out = []
    for site, perm in folds:
        kind = "coupling" if isinstance(site, Coupling) else "attention"
        out.append({"kind": kind, "site": asdict(site), "perm": [int(i) for i in perm]})
    return out


def folds_from_data(data: list[dict[str, Any]]) -> list[tuple[Coupling | AttentionSite, torch.Tensor]]:
    """Inverse of :func:`folds_to_data`."""
    folds: list[tuple[Coupling | AttentionSite, torch.Tensor]] = []
    for entry in data:
        site = dict(entry["site"])
        if entry["kind"] == "coupling":
            site["ops"] = [(name, [tuple(t) for t in tensors]) for name, tensors in site["ops"]]
            site["params"] = [tuple(p) for p in site["params"]]
            folds.append((Coupling(**site), torch.tensor(entry["perm"], dtype=torch.long)))
        elif entry["kind"] == "attention":
            folds.append((AttentionSite(**site), torch.tensor(entry["perm"], dtype=torch.long)))
        else:
            raise MPPluginError(f"unknown fold kind {entry['kind']!r} in a permutation record")
    return folds


def permutation_record(model: Any) -> dict[str, Any] | None:
    """``{"permutations": {consumer: [int, ...]}, "folds": folds_to_data(...)}`` of a permuted model, else None."""
    perms = getattr(model, "_mp_permutations", None)
    if not perms:
        return None
    return {
        "permutations": {k: [int(i) for i in v] for k, v in dict(perms).items()},
        "folds": folds_to_data(getattr(model, "_mp_permutation_folds", None) or []),
    }


def restore_permutation_record(model: Any, record: dict[str, Any]) -> None:
    """Inverse of :func:`permutation_record`: set ``model._mp_permutations`` and ``_mp_permutation_folds``."""
    model._mp_permutations = record["permutations"]
    model._mp_permutation_folds = folds_from_data(record["folds"])
