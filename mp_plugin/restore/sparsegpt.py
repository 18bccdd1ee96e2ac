"""SparseGPT with its weight update (Frantar & Alistarh 2023), written here from the paper.

For every target layer, in forward order and one block at a time (each block's
inputs come from the model already pruned before it, as the reference does for
transformer blocks), the column sweep of :func:`~mp_plugin.restore.obs_sweep`
chooses the mask by the saliency w²/[U]ⱼⱼ² (per k:n group at its first column,
or per block of 128 columns for unstructured counts) and writes the OBS-updated
weights back into the model. This is the ``sparsegpt-obs`` baseline; ModelOpt's
``sparsegpt`` mode computes the same update on a copy and keeps only the mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.layout import from_kn_matrix, kn_matrix
from mp_plugin.layers.patterns import Pattern
from mp_plugin.progress import progress
from mp_plugin.restore.config import RestoreConfig
from mp_plugin.restore.driver import block_grams
from mp_plugin.restore.layer import _group_views, _split_rows
from mp_plugin.restore.solve import damped, obs_sweep, output_energy

__all__ = ["sparsegpt_layer", "sparsegpt_obs"]


def sparsegpt_layer(
    weight: torch.Tensor, gram: Any, pattern: Pattern, n_prune: int, config: RestoreConfig, groups: int = 1
) -> dict[str, Any]:
    """Prune one layer in place by SparseGPT's sweep (mask selection and weight update).

    Args:
        weight: the dense weight (parameter), pruned in place (dtype and device kept).
        gram: the layer's :class:`~mp_plugin.restore.LayerGram`.
        pattern: k:n or unstructured; n_prune: weights to remove (unstructured).
        config: ``damp``, ``blocksize`` and ``dtype`` are used.
        groups: the conv's ``groups``.

    Returns:
        ``{"rel_error_after": …}`` on the calibration rows.
    """
    dt = torch.float64 if config.dtype == "float64" else torch.float32
    w_all = kn_matrix(weight.detach()).to(dt)
    out = torch.empty_like(w_all)
    quota = _split_rows(n_prune, groups)
    num = den = 0.0
    for q, sl in enumerate(_group_views(w_all, groups)):
        h0 = gram.gram[q].to(device=w_all.device, dtype=dt)
        h, _ = damped(h0, config.damp)
        select = (pattern.k, pattern.n) if pattern.is_kn else quota[q]
        x, _ = obs_sweep(w_all[sl], h, select=select, blocksize=config.blocksize)
        out[sl] = x
        num += output_energy(x - w_all[sl], h0)
        den += output_energy(w_all[sl], h0)
    with torch.no_grad():
        weight.copy_(from_kn_matrix(out, weight.shape).to(weight.dtype))
    return {"rel_error_after": num / den if den > 0 else 0.0, "rows": gram.rows}


def sparsegpt_obs(
    model: nn.Module,
    layers: dict[str, tuple[Pattern, int]],
    calibration: Any,
    config: RestoreConfig | None = None,
    sequential: bool = True,
    show_progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run SparseGPT over ``layers`` = ``{name: (pattern, n_prune)}`` of ``model`` (in place).

    Args:
        model: the dense model.
        layers: target layers with their pattern and unstructured count.
        calibration: batch(es) of model inputs.
        config: damping (0.01 of mean diag H, as the reference), sweep block (128), dtype.
        sequential: block-by-block inputs from the pruned model (the reference); False
            takes every layer's inputs from the dense model.
        show_progress: a tqdm bar.

    Returns:
        ``{name: record}``.
    """
    cfg = config or RestoreConfig()
    if calibration is None or (isinstance(calibration, list) and not calibration):
        raise MPPluginError("sparsegpt-obs needs calibration data")
    modules = dict(model.named_modules())
    records: dict[str, dict[str, Any]] = {}
    bar = progress(total=len(layers), desc="sparsegpt", unit="layer", disable=not show_progress)
    for block, grams in block_grams(model, list(layers), calibration, cfg, sequential):
        for name in block:
            pattern, n_prune = layers[name]
            mod = modules[name]
            if name not in grams:
                raise MPPluginError(f"calibration never reached layer {name!r}")
            groups = int(getattr(mod, "groups", 1))
            records[name] = sparsegpt_layer(mod.weight, grams[name], pattern, n_prune, cfg, groups)
            bar.update(1)
    bar.close()
    return records
