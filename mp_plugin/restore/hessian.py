"""Input Gram matrices H₀ = XᵀX of layers, captured with forward hooks.

Rows are what the weight multiplies (``mp_plugin.layers.calibration.layer_input_rows``):
tokens for a Linear, unfolded positions for a conv, reordered into the k:n
layout (``mp_plugin.layers.layout``) so that H's columns line up with
``kn_matrix(weight)``. A conv with ``groups = Q`` gets one H per conv group
(its weight rows q·C_out/Q … read only input block q), so depthwise and grouped
convs are restored per group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.calibration import eval_mode, layer_input_rows, run_batches
from mp_plugin.layers.layout import kn_input_columns

__all__ = ["LayerGram", "capture_grams", "gram_hooks", "grams_of", "RestoreError", "StopForward", "run_stoppable"]


class RestoreError(MPPluginError):
    """Prune–restore cannot run on the given calibration data (non-finite inputs, …)."""


class StopForward(BaseException):
    """Raised by a hook to end a calibration forward pass early (not an error)."""


@dataclass
class LayerGram:
    """Uncentred input Gram of one layer.

    Attributes:
        gram: (Q, d, d) sum over rows of x xᵀ (input units²), Q = conv groups
            (1 for Linear), d = (C_in/Q)·kh·kw in the k:n layout.
        rows: number of input rows summed.
    """

    gram: torch.Tensor
    rows: int

    @property
    def width(self) -> int:
        """d, the input width of one conv group."""
        return int(self.gram.shape[-1])

    def block_covariance(self, n: int) -> torch.Tensor:
        """The (Q·d/n, n, n) diagonal n×n blocks of H₀/rows: CAST's per-group covariances."""
        q, d, _ = self.gram.shape
        g = d // n
        h = (self.gram / max(1, self.rows)).reshape(q, g, n, g, n)
        idx = torch.arange(g, device=h.device)
        return h[:, idx, :, idx, :].permute(1, 0, 2, 3).reshape(q * g, n, n)


class _GramHook:
    def __init__(self, name: str, module: nn.Module, dtype: torch.dtype, max_rows: int | None, gen: torch.Generator):
        self.name = name
        self.module = module
        self.dtype = dtype
        self.max_rows = max_rows
        self.gen = gen
        self.gram: torch.Tensor | None = None
        self.rows = 0

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        room = None if self.max_rows is None else self.max_rows - self.rows
        if room is not None and room <= 0:
            return
        x = layer_input_rows(module, inputs[0].detach())
        groups = int(getattr(module, "groups", 1))
        if module.weight.dim() > 2:
            x = kn_input_columns(x, int(module.in_channels), groups)
        if x.shape[0] == 0:  # e.g. a batch whose attention_mask has no real token
            return
        if room is not None and x.shape[0] > room:
            pick = torch.randperm(x.shape[0], generator=self.gen)[:room].to(x.device)
            x = x.index_select(0, pick)
        # products in float32 (fast BLAS), summed over batches in self.dtype: the per-batch
        # rounding (~1e-7 relative) is far below the damping λ = 0.01·mean diag H
        fast = self.dtype == torch.float64 and x.dtype != torch.float64  # float32 products, unless the layer is float64
        x = x.to(torch.float32 if fast else self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise RestoreError(
                f"layer {self.name!r}: its calibration input holds NaN or Inf; restore needs finite activations "
                "(check the calibration batch and the layers before this one)"
            )
        xq = x.reshape(x.shape[0], groups, -1).transpose(0, 1)  # (Q, rows, d)
        g = (xq.transpose(1, 2) @ xq).to(self.dtype)
        if fast and not bool(torch.isfinite(g).all()):  # float32 products overflowed (|x| ≳ 1e19): redo in float64
            xq = xq.to(torch.float64)
            g = xq.transpose(1, 2) @ xq
        self.gram = g if self.gram is None else self.gram + g
        self.rows += int(x.shape[0])


@contextmanager
def gram_hooks(
    model: nn.Module,
    names: Sequence[str],
    dtype: torch.dtype = torch.float64,
    max_rows: int | None = None,
    seed: int = 0,
) -> Iterator[dict[str, _GramHook]]:
    """Forward hooks that accumulate each named layer's Gram while the ``with`` block runs.

    Yields ``{name: hook}``; after the block, :func:`grams_of` turns them into
    :class:`LayerGram` records. The hooks are removed on exit.

    Raises:
        MPPluginError: ``model`` has no module of one of the names.
    """
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    hooks: dict[str, _GramHook] = {}
    handles = []
    try:
        for name in names:
            module = modules.get(name)
            if module is None:
                raise MPPluginError(f"the model has no module {name!r}")
            hook = _GramHook(name, module, dtype, max_rows, gen)
            hooks[name] = hook
            handles.append(module.register_forward_hook(hook))
        yield hooks
    finally:
        for h in handles:
            h.remove()


def grams_of(hooks: dict[str, _GramHook]) -> dict[str, LayerGram]:
    """``{name: LayerGram}`` of the hooks that saw at least one input row."""
    return {name: LayerGram(h.gram, h.rows) for name, h in hooks.items() if h.gram is not None}


def capture_grams(
    model: nn.Module,
    names: Sequence[str],
    data: Any,
    dtype: torch.dtype = torch.float64,
    max_rows: int | None = None,
    stop_after: str | None = None,
    seed: int = 0,
) -> dict[str, LayerGram]:
    """Run calibration ``data`` through ``model`` and return each named layer's :class:`LayerGram`.

    Args:
        model: the model (run in eval mode under ``no_grad``; its mode is restored).
        names: module names of Linear/Conv1d/Conv2d layers.
        data: one batch or a list of batches (see ``mp_plugin.layers.calibration.run_batches``).
        dtype: precision of the accumulated Gram (float64 or float32); each batch's product
            XᵀX is formed in float32 and added in ``dtype``.
        max_rows: at most this many input rows per layer, None = all: the first rows reached,
            in batch order (a random subset of the batch that crosses the limit).
        stop_after: end each batch's forward pass once this layer has run (the
            layers after it are not needed), to save time in sequential restore.
        seed: seed of the row subsampling.

    Returns:
        ``{name: LayerGram}`` for every layer the calibration reached (a layer
        never called is missing).

    Raises:
        RestoreError: a layer's input is not finite.
    """
    with gram_hooks(model, names, dtype, max_rows, seed) as hooks:
        handle = None if stop_after is None else dict(model.named_modules())[stop_after].register_forward_hook(_stop)
        try:
            run_stoppable(model, data)
        finally:
            if handle is not None:
                handle.remove()
    return grams_of(hooks)


def run_stoppable(model: nn.Module, data: Any, first: int = 0) -> None:
    """Run calibration ``data`` through ``model`` in eval mode, each batch's forward ending early
    where a hook raises :class:`StopForward` (see ``mp_plugin.layers.calibration.run_batches``);
    ``first`` is the index of ``data[0]`` among the caller's batches (for messages)."""
    batches = data if isinstance(data, list) else [data]
    if batches:  # the rest of a single-batch calibration is empty: nothing to run
        with eval_mode(model):
            run_batches(model, batches, stop=StopForward, first=first)


def _stop(module: nn.Module, inputs: tuple, output: Any) -> None:
    raise StopForward
