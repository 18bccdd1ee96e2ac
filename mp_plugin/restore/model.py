"""Restore a model that was pruned by any tool, against its dense weights."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError, PlanMismatchError
from mp_plugin.layers.offload import first_offloaded
from mp_plugin.progress import progress
from mp_plugin.restore.config import RestoreConfig
from mp_plugin.restore.driver import block_grams
from mp_plugin.restore.layer import restore_layer

__all__ = ["restore_model"]


def _kept_differ(pruned: torch.Tensor, dense: torch.Tensor) -> bool:
    """Whether most kept weights of ``pruned`` differ from ``dense`` (another basis, or re-solved already)."""
    kept = pruned != 0
    if not bool(kept.any()):
        return False
    a, b = pruned[kept].double(), dense.to(pruned.device)[kept].double()
    return bool(((a - b).abs() > 1e-3 * b.abs().clamp_min(1e-12)).double().mean() > 0.5)


def restore_model(
    pruned: nn.Module,
    dense: nn.Module | Mapping[str, torch.Tensor],
    calibration: Any,
    layers: Sequence[str] | None = None,
    config: RestoreConfig | None = None,
    show_progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Re-solve the non-zero weights of ``pruned``'s layers (its masks = its non-zeros) in place.

    Args:
        pruned: a model pruned by any method (exact zeros in its weights).
        dense: the dense model, or ``{layer name: dense weight}``, in ``pruned``'s channel basis:
            for a model whose channels ``apply(..., permute=...)`` permuted, pass
            ``mp.align_to_permuted(dense, plan)`` (a warning says when most kept weights differ
            from the dense ones).
        calibration: batch(es) of model inputs.
        layers: module names to restore; default every Linear/Conv1d/Conv2d of
            ``pruned`` that has an exact zero (and, for a dict ``dense``, a dense weight in it).
        config: restore settings (``sequential=True``: each block's inputs come from
            ``pruned`` already restored before it; otherwise from the dense model when
            ``dense`` is a model, else from ``pruned`` as given).
        show_progress: a tqdm bar over layers.

    Returns:
        ``{layer name: restore record}`` (see :func:`~mp_plugin.restore.restore_layer`).
    """
    cfg = config or RestoreConfig()
    if calibration is None or (isinstance(calibration, list) and not calibration):
        raise MPPluginError("restore needs calibration data (one batch or a list of batches of model inputs)")
    modules = dict(pruned.named_modules())
    for model in (pruned, dense) if isinstance(dense, nn.Module) else (pruned,):
        offloaded = first_offloaded(model)
        if offloaded is not None:
            raise MPPluginError(
                f"restore_model needs the layers in memory, but {offloaded!r} is offloaded by accelerate; "
                "for an offloaded model prune and restore in one step: mp.apply(model, plan, calibration, "
                "restore=RestoreConfig())"
            )
    if layers is None:
        layers = [
            n
            for n, m in modules.items()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and bool((m.weight == 0).any())
            and (isinstance(dense, nn.Module) or n in dense)  # a dict names the layers it has weights for
        ]
    if isinstance(dense, nn.Module):
        dmods = dict(dense.named_modules())
        dense_w = {n: dmods[n].weight.detach() for n in layers if n in dmods}
    else:
        dense_w = {n: dense[n] for n in layers if n in dense}
    for n in layers:
        if n not in modules or n not in dense_w:
            raise PlanMismatchError(f"layer {n!r} is missing from the pruned or the dense model")
        if tuple(dense_w[n].shape) != tuple(modules[n].weight.shape):
            raise PlanMismatchError(
                f"layer {n!r}: dense {tuple(dense_w[n].shape)} vs pruned {tuple(modules[n].weight.shape)}"
            )
    differ = [n for n in layers if _kept_differ(modules[n].weight.detach(), dense_w[n])]
    if differ:
        warnings.warn(
            f"restore_model: the kept (non-zero) weights of {len(differ)} layer(s), e.g. {differ[0]!r}, differ from "
            "the dense ones; restore re-solves them from the dense weights. If the channels were permuted "
            "(apply(..., permute=...)), pass dense=mp.align_to_permuted(dense, plan)",
            stacklevel=2,
        )
    records: dict[str, dict[str, Any]] = {}
    bar = progress(total=len(layers), desc="restore", unit="layer", disable=not show_progress)
    source = dense if isinstance(dense, nn.Module) else None
    for block, grams in block_grams(pruned, layers, calibration, cfg, cfg.sequential, source=source):
        for name in block:
            gram = grams.get(name)
            if gram is None:
                records[name] = {"notes": ["not reached by calibration; not restored"]}
            else:
                mod = modules[name]
                weight = dense_w[name].to(mod.weight.device)
                records[name] = restore_layer(mod.weight, weight, gram, cfg, int(getattr(mod, "groups", 1)))
            bar.update(1)
    bar.close()
    return records
