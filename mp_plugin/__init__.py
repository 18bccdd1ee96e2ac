"""mp-plugin: Marchenko–Pastur (random-matrix) pruning for PyTorch models.

Core (framework-free: torch, numpy, scipy):

* :func:`fit_marchenko_pastur` / :class:`SpectralFit` — MP fit of one weight.
* :func:`plan` / :class:`PrunePlan` — per-layer budgets and patterns.
* :func:`apply`, :func:`sparsity_report`, :class:`MaskKeeper` — prune and keep masks.
* :func:`permute_channels` — k:n channel permutation folded into the weights
  (:func:`align_to_permuted`: a dense model in a permuted model's channel basis).
* :func:`certify` — data-path certificate of which predictions pruning kept.

Adapters for torchao, ModelOpt, ONNX and TensorRT live in
``mp_plugin.integrations``; ``MPSparsifier`` is imported lazily from there
(``mp_plugin.MPSparsifier`` needs torchao, so ``from mp_plugin import *`` leaves it out).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mp_plugin.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    DataError,
    InvalidSparsityError,
    InvalidWeightError,
    MPPluginError,
    NoPrunableLayersError,
    NotCertifiable,
    PatternError,
    PlanFormatError,
    PlanMismatchError,
    SpectrumFitError,
)
from mp_plugin.layers.discovery import LayerSelection, find_target_layers
from mp_plugin.layers.patterns import Pattern
from mp_plugin.planning.build import plan
from mp_plugin.planning.plan import LayerPlan, PlanConfig, PrunePlan
from mp_plugin.spectrum import SpectralFit, fit_marchenko_pastur

__version__ = "0.1.0"

_LAZY = {
    "apply": "mp_plugin.pruning.apply_plan",
    "sparsity_report": "mp_plugin.pruning.apply_plan",
    "MaskKeeper": "mp_plugin.masks.keep",
    "permute_channels": "mp_plugin.permute",
    "align_to_permuted": "mp_plugin.permute",
    "certify": "mp_plugin.certificate",
    "RestoreConfig": "mp_plugin.restore",
    "restore_model": "mp_plugin.restore",
    "MPSparsifier": "mp_plugin.integrations.torchao",
}
# lazy names that need an optional framework: reachable as attributes, left out of ``import *``
_OPTIONAL = frozenset({"MPSparsifier"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mp_plugin' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InvalidSparsityError",
    "InvalidWeightError",
    "LayerPlan",
    "LayerSelection",
    "MPPluginError",
    "NoPrunableLayersError",
    "NotCertifiable",
    "Pattern",
    "PatternError",
    "PlanConfig",
    "PlanFormatError",
    "PlanMismatchError",
    "PrunePlan",
    "SpectralFit",
    "SpectrumFitError",
    "find_target_layers",
    "fit_marchenko_pastur",
    "plan",
    *(name for name in _LAZY if name not in _OPTIONAL),
]
