"""Prune–restore: re-solve the kept weights inside a fixed pattern (ALGORITHM.md §7).

After a mask is chosen, each layer's surviving weights become the least-squares
minimiser of its output error on calibration data, ‖(Ŵ − W)Xᵀ‖² + λ‖Ŵ − W‖²
with Ŵ = 0 off the mask. Entry points:

* ``mp_plugin.apply(model, plan, calibration, restore=True)`` (or a :class:`RestoreConfig`);
* :func:`prune_and_restore` for a list of layers; :func:`restore_layer` for one
  layer whose mask is already chosen (any mask source: magnitude, SEB, CAST, SER, Wanda);
* :func:`restore_model` to restore a model pruned by any tool against its dense copy;
* mask projections that know about compensation: ``"obs"`` (SparseGPT's
  selection in the column sweep) and ``"cast-obs"`` (compensated CAST cost).
"""

from mp_plugin.restore.config import RestoreConfig, resolve_restore
from mp_plugin.restore.driver import LayerTask, block_key, execution_order, forward_blocks, prune_and_restore
from mp_plugin.restore.hessian import LayerGram, RestoreError, capture_grams
from mp_plugin.restore.layer import NEEDS_GRAM, PROJECTIONS, register_projection, restore_layer, select_mask
from mp_plugin.restore.model import restore_model
from mp_plugin.restore.solve import obs_sweep, relative_error, restore_cg, restore_direct

__all__ = [
    "RestoreConfig",
    "resolve_restore",
    "RestoreError",
    "LayerGram",
    "capture_grams",
    "LayerTask",
    "prune_and_restore",
    "execution_order",
    "block_key",
    "forward_blocks",
    "restore_layer",
    "restore_model",
    "select_mask",
    "register_projection",
    "PROJECTIONS",
    "NEEDS_GRAM",
    "obs_sweep",
    "restore_direct",
    "restore_cg",
    "relative_error",
]
