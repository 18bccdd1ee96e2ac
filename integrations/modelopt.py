"""NVIDIA ModelOpt adapter: the sparsity mode ``"mp"``.

Importing this module registers ``"mp"`` in ModelOpt's sparsity mode registry
(idempotent on re-import). Then::

    import modelopt.torch.sparsity as mts
    import mp_plugin.integrations.modelopt  # registers "mp"
    model = mts.sparsify(model, mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})

The mode converts Linear/Conv2d to ModelOpt's sparse modules (masks held as
buffers and applied in every forward, so training and ``kd_loss``
distillation keep them), and its searcher plans MP budgets over the whole
model with ``mp_plugin.plan`` and applies them with ``mp_plugin.apply``.
Unlike ModelOpt's own searchers it accepts unstructured and any k:n pattern.

Search config keys (all optional): ``sparsity`` (0.5), ``pattern`` ("2:4";
"unstructured", "auto", "k:n" and ModelOpt's "2:4 sparsity" spelling),
``budget`` (``mp_plugin.budget.rules.DEFAULT_BUDGET``; any key of ``BUDGET_METHODS``), ``projection``
("magnitude" | "cast" | "obs" | "cast-obs"), ``restore`` (False, True or a
``mp_plugin.restore.RestoreConfig``: re-solve the kept weights on the calibration
data; the restored values go into the module's real parameter), ``calibration``
(a batch, or a list of batches), ``plan_config``; ``method`` is the deprecated
spelling of both. Instead of ``calibration``, ModelOpt's own ``forward_loop`` or
``data_loader`` keys may supply the calibration data: the inputs they feed the
model are recorded once and replayed as calibration batches.

``mto.restore`` in a fresh process needs this module imported first;
:func:`restore` does both. With distillation, export in the order
``mtd.export`` then ``mts.export``. Uses ModelOpt 0.47 private APIs
(``SparsityModeRegistry``, ``BaseSparseSearcher``): the version is pinned.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

try:
    from modelopt.torch.opt.config import get_kwargs_for_create_model_with_rules
    from modelopt.torch.sparsity.weight_sparsity.mode import SparseMagnitudeModeDescriptor, SparsityModeRegistry
    from modelopt.torch.sparsity.weight_sparsity.module import SparseModule, SpDMRegistry
    from modelopt.torch.sparsity.weight_sparsity.searcher import BaseSparseSearcher
    from pydantic import create_model
except ImportError as exc:  # pragma: no cover - exercised only without modelopt
    raise ImportError(
        "mp_plugin.integrations.modelopt needs nvidia-modelopt 0.47 (and requests, huggingface_hub): "
        "pip install 'mp-plugin[modelopt]'"
    ) from exc

from mp_plugin import apply as mp_apply
from mp_plugin.budget.rules import DEFAULT_BUDGET
from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.layers.patterns import Pattern
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan, split_method

__all__ = ["MODE_NAME", "MPModeDescriptor", "MPSearcher", "MPSparseConfig", "restore"]

MODE_NAME = "mp"

MPSparseConfig = create_model(
    "MPSparseConfig",
    **get_kwargs_for_create_model_with_rules(
        registry=SpDMRegistry,
        default_rules={"nn.Linear": {"*": {}, "*lm_head*": None}, "nn.Conv2d": {"*": {}, "*lm_head*": None}},
        doc='Configuration for the ``"mp"`` (Marchenko–Pastur) sparsity mode.',
    ),
)


def _normalise_pattern(text: str) -> str:
    text = str(text).replace("sparsity", "").strip()
    return text if text == "auto" else str(Pattern.parse(text))


class MPSearcher(BaseSparseSearcher):
    """ModelOpt searcher that sets masks from an MP plan over the whole model."""

    plan: PrunePlan | None = None

    @property
    def default_search_config(self) -> dict[str, Any]:
        """ModelOpt's keys plus ``sparsity``, ``pattern``, ``budget``, ``projection``, ``calibration``, ``plan_config``."""
        return {
            **super().default_search_config,
            "pattern": "2:4",
            "sparsity": 0.5,
            "budget": DEFAULT_BUDGET,
            "projection": "magnitude",
            "restore": False,
            "method": None,
            "calibration": None,
            "plan_config": None,
        }

    def sanitize_search_config(self, config: dict[str, Any] | None) -> dict[str, Any]:
        """Fill defaults, reject unknown keys, and accept any pattern mp_plugin supports."""
        full = {**self.default_search_config, **(config or {})}
        unknown = set(full) - set(self.default_search_config)
        if unknown:
            raise MPPluginError(f"unknown config keys for mode 'mp': {sorted(unknown)}")
        full["pattern"] = _normalise_pattern(full["pattern"])
        return full

    def _check_weight_size(self, weight, mod_name) -> bool:  # noqa: ANN001 - ModelOpt's signature
        return True

    def _compute_mask(self, module):  # noqa: ANN001 - masks are set in run_search
        raise NotImplementedError("MPSearcher sets all masks at once in run_search")

    def run_search(self) -> None:
        """Plan MP budgets for all sparse modules, prune them, and store the masks in the modules."""
        cfg = self.config
        sparse = {n: m for n, m in self.model.named_modules() if isinstance(m, SparseModule) and m.is_sparse}
        if not sparse:
            raise MPPluginError("mode 'mp' found no sparsifiable Linear/Conv2d module")
        for module in sparse.values():
            module.set_mask(None)  # read and write the raw weights
        base = cfg["plan_config"] or PlanConfig()
        sel = LayerSelection(**{**base.selection.to_dict(), "include_only": [f"^{re.escape(n)}$" for n in sparse]})
        budget_method, projection = split_method(cfg["budget"], cfg["projection"], cfg["method"], "mts.sparsify")
        calibration = cfg["calibration"]
        if calibration is None and self.forward_loop is not None:
            calibration = _record_inputs(self.model, self.forward_loop)
        the_plan = plan(
            self.model,
            cfg["sparsity"],
            cfg["pattern"],
            budget_method,
            PlanConfig(**{**base.__dict__, "selection": sel}),
            calibration=calibration,
        )
        mp_apply(
            self.model,
            the_plan,
            calibration=calibration,
            projection=projection,
            restore=cfg["restore"],
        )
        for module in sparse.values():
            mask = module.weight.detach() != 0
            if bool(mask.all()):
                # set_mask would drop an all-True mask, but a fresh convert (mto.restore) creates one:
                # keep it as a buffer so save/restore state_dicts match
                module._weight_mask = mask
            else:
                module.set_mask(mask)
        self.model._mp_plan = the_plan  # not a buffer: not saved, for inspection only
        MPSearcher.plan = the_plan


def _record_inputs(model: nn.Module, forward_loop: Any) -> list[Any]:
    """The batches ModelOpt's ``forward_loop`` feeds ``model``, as calibration batches (tuple or dict each)."""
    batches: list[Any] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args and kwargs:
            raise MPPluginError("mode 'mp' cannot replay a forward call with both positional and keyword inputs")
        batches.append(dict(kwargs) if kwargs else tuple(args))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_loop(model)
    finally:
        handle.remove()
    if not batches:
        raise MPPluginError("mode 'mp': the forward_loop/data_loader ran no batch through the model")
    return batches


class MPModeDescriptor(SparseMagnitudeModeDescriptor):
    """The ``"mp"`` sparsity mode: ModelOpt's sparse modules, MP budgets from mp_plugin."""

    @property
    def name(self) -> str:
        """Mode name used in ``mts.sparsify(..., mode="mp")``."""
        return MODE_NAME

    @property
    def config_class(self) -> type:
        """The mode's (rule-based) config class."""
        return MPSparseConfig

    @property
    def search_algorithm(self) -> type:
        """The searcher that computes the masks."""
        return MPSearcher


if MODE_NAME not in SparsityModeRegistry:
    SparsityModeRegistry.register_mode(MPModeDescriptor)


def restore(model: nn.Module, path: str | Path) -> nn.Module:
    """``mto.restore`` for a model saved after ``mode="mp"`` (registers the mode first)."""
    import modelopt.torch.opt as mto

    return mto.restore(model, str(path))
