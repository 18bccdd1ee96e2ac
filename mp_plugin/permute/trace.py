"""Trace a module with torch.fx for the coupling analysis: leaves, timm's untraceable blocks, train and eval mode."""

from __future__ import annotations

import sys

from torch import fx, nn

__all__ = ["trace_in_mode"]


def _timm_fx() -> tuple[tuple, tuple]:
    """timm's no-trace functions and modules, when timm is loaded (a timm model has loaded it); never imports it."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return (), ()
    try:
        funcs = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
        mods = tuple(m for m in timm_fx.get_notrace_modules() if isinstance(m, type))
    except Exception:  # noqa: BLE001 - an older or newer timm without these registries
        return (), ()
    return funcs, mods


class _Tracer(fx.Tracer):
    """fx tracer keeping Linear/Conv/Norm layers (and timm's no-trace modules) as leaves."""

    def __init__(self) -> None:
        funcs, mods = _timm_fx()
        super().__init__(autowrap_functions=funcs)
        self._extra_leaves = mods
        self.opaque: dict[str, str] = {}  # qualified name → class of a module kept whole (timm: not traceable)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
        if isinstance(m, leaf_types):
            return True
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            self.opaque[module_qualified_name] = type(m).__name__
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_in_mode(module: nn.Module, training: bool) -> fx.Graph:
    """``module``'s graph traced with every submodule in train (or eval) mode; the flags are restored."""
    flags = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        tracer = _Tracer()
        graph = tracer.trace(module)
        graph.opaque = tracer.opaque  # type: ignore[attr-defined]
        return graph
    finally:
        for m, flag in flags.items():
            m.training = flag
