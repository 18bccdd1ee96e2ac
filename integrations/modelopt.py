"""NVIDIA ModelOpt adapter: the sparsity mode ``"mp"``.

Importing this module registers ``"mp"`` in ModelOpt's sparsity mode registry
(idempotent: re-importing, reloading or calling :func:`register` again is a no-op). Then::

    import modelopt.torch.sparsity as mts
    import mp_plugin.integrations.modelopt as mpm  # registers "mp"
    model = mts.sparsify(model, mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
    plan = mpm.plan_of(model)  # the PrunePlan that made the masks (also after mto.restore)

The mode converts Linear/Conv2d to ModelOpt's sparse modules (masks held as
buffers and applied in every forward, so training and ``kd_loss``
distillation keep them). Its searcher follows ModelOpt's own flow: ModelOpt
picks the sparsifiable modules (calling :meth:`MPSearcher._check_weight_size`,
which accepts a weight when the requested pattern fits its shape), the searcher
plans MP budgets over all of them at once with ``mp_plugin.plan``, prunes with
``mp_plugin.apply``, and ModelOpt's ``run_search`` hands each module its mask
through ``SparseModule.set_mask``. Unlike ModelOpt's own searchers it accepts
unstructured and any k:n pattern.

The plan lives in the searcher instance (its ModelOpt search state, ``plan``)
and, as the ``PrunePlan`` JSON dict, in the mode's ModelOpt metadata under
:data:`PLAN_METADATA_KEY`. ``mto.save`` writes that metadata with the model and
``mto.restore`` loads it back, so :func:`plan_of` works on a freshly restored
model, through ``mtd`` distillation, after ``mts.export`` and on a model wrapped
in DataParallel/DDP or ``torch.compile``. Nothing is set on the user's model.

Search config keys (all optional): ``sparsity`` (0.5), ``pattern`` ("2:4";
"unstructured", "auto", "k:n" and ModelOpt's "2:4 sparsity" spelling),
``budget`` (None: ``mp_plugin.budget.rules.default_budget(restore)``, i.e. ``DEFAULT_BUDGET``, or
``DEFAULT_RESTORE_BUDGET`` with ``restore``; any key of ``BUDGET_METHODS``), ``projection``
("magnitude" | "cast" | "obs" | "cast-obs"; None: apply's default, ``"cast-obs"`` with
``restore``, else ``"magnitude"``), ``restore`` (False, True or a
``mp_plugin.restore.RestoreConfig``: re-solve the kept weights on the calibration
data; the restored values go into the module's real parameter), ``permute``
(False, True = "swap", "swap" or "interleave": ``mp_plugin.permute.permute_channels``
reorders input channels, folded into the weights, before the masks are chosen;
k:n patterns only; ``mp_plugin.apply`` stores what was folded in the plan, ``applied["permutation"]``),
``calibration`` (a batch, or a list of batches), ``plan_config``; ``method`` is the deprecated
spelling of both. Instead of ``calibration``, ModelOpt's own ``forward_loop`` or
``data_loader`` keys may supply the calibration data: the inputs they feed the
model are recorded once and replayed as calibration batches.

``mto.restore`` in a fresh process needs this module imported first;
:func:`restore` does both. With distillation, export in the order
``mtd.export`` then ``mts.export``. Uses ModelOpt 0.47 APIs that are not in its
documented user API (``SparsityModeRegistry``, ``BaseSparseSearcher``,
``ModeloptStateManager.state_dict``): the version is pinned.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from modelopt.torch.opt.config import get_kwargs_for_create_model_with_rules
    from modelopt.torch.opt.conversion import ModeloptStateManager
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
from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import unwrap_model as unwrap_wrappers
from mp_plugin.masks.select import nm_mask
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan, split_method

__all__ = [
    "MODE_NAME",
    "PLAN_METADATA_KEY",
    "MPModeDescriptor",
    "MPSearcher",
    "MPSparseConfig",
    "has_plan",
    "plan_of",
    "register",
    "restore",
]

MODE_NAME = "mp"
PLAN_METADATA_KEY = "mp_plan"  # key of the PrunePlan JSON dict in the "mp" mode's ModelOpt metadata

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


def _keep_exactly(weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    """An unstructured mask that keeps ``n_keep`` entries: every nonzero weight, topped up with the first
    exact zeros (flat order) when a kept weight is itself zero, so the mask never prunes more than the plan."""
    mask = (weight != 0).contiguous()  # a channels_last weight: reshape(-1) would write to a copy
    missing = n_keep - int(mask.sum())
    if missing > 0:
        flat = mask.view(-1)
        flat[(~flat).nonzero().reshape(-1)[:missing]] = True
    return mask


class MPSearcher(BaseSparseSearcher):
    """ModelOpt searcher that sets masks from an MP plan over the whole model.

    One instance per ``mts.sparsify`` call (ModelOpt creates it). After the search its
    ``plan`` attribute (ModelOpt search state) holds the ``PrunePlan`` JSON dict, which is
    also written into the model's ModelOpt metadata (read it with :func:`plan_of`).
    """

    @property
    def default_search_config(self) -> dict[str, Any]:
        """ModelOpt's keys plus ``sparsity``, ``pattern``, ``budget``, ``projection``, ``restore``, ``permute``,
        ``calibration``, ``plan_config``."""
        return {
            **super().default_search_config,
            "pattern": "2:4",
            "sparsity": 0.5,
            "budget": None,
            "projection": None,
            "restore": False,
            "permute": False,
            "method": None,
            "calibration": None,
            "plan_config": None,
        }

    @property
    def default_state_dict(self) -> dict[str, Any]:
        """Search state, reset per search: ``plan`` (the ``PrunePlan`` JSON dict once the search ran)."""
        return {"plan": None}

    def sanitize_search_config(self, config: dict[str, Any] | None) -> dict[str, Any]:
        """Fill defaults, reject unknown keys, and accept any pattern mp_plugin supports."""
        full = {**self.default_search_config, **(config or {})}
        unknown = set(full) - set(self.default_search_config)
        if unknown:
            raise MPPluginError(f"unknown config keys for mode 'mp': {sorted(unknown)}")
        full["pattern"] = _normalise_pattern(full["pattern"])
        return full

    def _check_weight_size(self, weight: nn.Parameter, mod_name: str) -> bool:
        """ModelOpt's size check, our rule: the weight must fit the requested pattern.

        k:n groups run along input channels (``mp_plugin.layers.layout``), so a ``k:n`` request
        needs ``weight.shape[1] % n == 0``; unstructured fits any shape, and with ``"auto"`` the
        planner picks a pattern that fits each layer. A weight that does not fit is skipped with
        a warning, as ModelOpt's own searchers do, and keeps ModelOpt's all-ones mask.
        """
        pattern = self.config["pattern"]
        if pattern == "auto" or Pattern.parse(pattern).eligible(tuple(weight.shape)):
            return True
        warnings.warn(
            f"Skipping sparsifying {mod_name} of size={weight.size()!s}: pattern {pattern} needs input "
            f"channels divisible by {Pattern.parse(pattern).n}",
            stacklevel=2,
        )
        return False

    def before_search(self) -> None:
        """Plan MP budgets for all sparsifiable modules at once and prune them (``mp_plugin.plan`` + ``apply``)."""
        super().before_search()
        cfg = self.config
        sparse = dict(self._named_sparsifiable_modules())
        if not sparse:
            raise MPPluginError("mode 'mp' found no sparsifiable Linear/Conv2d module")
        for module in sparse.values():
            module.set_mask(None)  # masks off: ``module.weight`` is the raw parameter, read and written in place
        base = cfg["plan_config"] or PlanConfig()
        if isinstance(base, dict):  # a PlanConfig's to_dict(), as MPSparsifier also takes
            base = PlanConfig.from_dict(base)
        sel = LayerSelection(**{**base.selection.to_dict(), "include_only": [f"^{re.escape(n)}$" for n in sparse]})
        budget_method, projection = split_method(
            cfg["budget"], cfg["projection"], cfg["method"], "mts.sparsify", cfg["restore"]
        )
        try:
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
                permute=cfg["permute"],
            )
        except Exception:
            for module in sparse.values():
                module.modify()  # give the modules back ModelOpt's all-ones masks
            raise
        # plain JSON types only: ModelOpt saves the metadata with torch.save and loads it with weights_only=True
        self.plan = json.loads(json.dumps(the_plan.to_dict()))
        _mode_metadata(self.model)[PLAN_METADATA_KEY] = self.plan

    def _compute_mask(self, module: SparseModule) -> Any:
        """The module's mask after ``before_search`` pruned it (bool, weight's shape), from the plan.

        A layer the plan pruned keeps its nonzero weights (a k:n layer: the k:n mask of its
        pruned weight, so a kept weight that is exactly zero still counts as kept; an unstructured
        layer: topped up with exact zeros to the plan's count, :func:`_keep_exactly`); a layer
        the plan leaves dense, or does not hold, keeps every weight, zeros included (e.g. a
        zero-initialised head stays trainable). ModelOpt's ``run_search`` passes it to
        ``module.set_mask``.
        """
        weight = module.weight.detach()
        name = next((n for n, m in self.model.named_modules() if m is module), None)
        layer = next((lp for lp in (self.plan or {}).get("layers", []) if lp["name"] == name), None)
        pat = Pattern.parse(layer["pattern"] if layer is not None else "dense")
        if pat.kind == "dense":
            return torch.ones_like(weight, dtype=torch.bool)
        if pat.is_kn:
            return nm_mask(weight, pat.k, pat.n).to(torch.bool)
        return _keep_exactly(weight, weight.numel() - int(layer["n_prune"]))

    def after_search(self) -> None:
        """Give modules whose mask is all True ModelOpt's all-ones mask buffer back.

        ``set_mask`` drops an all-True mask, but a fresh convert (``mto.restore``) creates one
        as a buffer; ``SparseModule.modify`` re-creates it (a no-op where a mask is set), so the
        saved and the restored state_dicts have the same keys.
        """
        for module in self.model.modules():
            if isinstance(module, SparseModule) and module.is_sparse:
                module.modify()
        super().after_search()


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


def _mode_metadata(model: nn.Module, strict: bool = True) -> dict[str, Any] | None:
    """The metadata dict of the last ``"mp"`` mode in ``model``'s ModelOpt state (a live reference).

    Without one: MPPluginError when ``strict``, else None. ModelOpt 0.47 has no public call that
    adds metadata to a mode after ``convert`` (a searcher runs after it); the least private route
    is ``ModeloptStateManager.state_dict()`` (the exported manager class), whose entries are the
    live per-mode ``{"config", "metadata"}`` dicts that ``mto.save`` writes and ``mto.restore``
    loads back.
    """
    model = unwrap_wrappers(model)  # DDP, DataParallel, FSDP, torch.compile: the ModelOpt state is inside
    if not ModeloptStateManager.is_converted(model):
        if strict:
            raise MPPluginError("the model has no ModelOpt state: sparsify it with mts.sparsify(model, mode='mp')")
        return None
    for mode, state in reversed(ModeloptStateManager(model).state_dict()):
        if mode == MODE_NAME:
            return state["metadata"]
    if strict:
        raise MPPluginError(
            "the model's ModelOpt state has no 'mp' mode: sparsify it with mts.sparsify(model, mode='mp')"
        )
    return None


def has_plan(model: nn.Module) -> bool:
    """Whether ``model`` (wrapped or not) carries a plan of mode ``"mp"`` in its ModelOpt state."""
    metadata = _mode_metadata(model, strict=False)
    return metadata is not None and PLAN_METADATA_KEY in metadata


def plan_of(model: nn.Module) -> PrunePlan:
    """The :class:`~mp_plugin.planning.build.PrunePlan` that made the masks of a model sparsified with mode ``"mp"``.

    Read from the ``"mp"`` mode's ModelOpt metadata, so it works right after ``mts.sparsify``,
    after ``mto.save`` + ``mto.restore`` (or :func:`restore`) in a fresh process, on the
    ``mtd`` distillation model, after ``mts.export``, and through DataParallel/DDP/FSDP or
    ``torch.compile`` wrappers. ``plan.applied`` holds what ``mp_plugin.apply`` recorded;
    with ``permute`` that includes the folded permutation (``applied["permutation"]``: pass the
    plan to ``mp_plugin.permute.align_to_permuted`` or ``certify(..., plan=...)``). Each call
    returns a new object.

    Raises:
        MPPluginError: the model was not sparsified with mode ``"mp"``, or its state holds no plan.
    """
    data = _mode_metadata(model).get(PLAN_METADATA_KEY)
    if data is None:
        raise MPPluginError("the model's 'mp' mode metadata holds no plan (the search did not run or failed)")
    return PrunePlan.from_dict(json.loads(json.dumps(data)))


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


def register() -> None:
    """Register mode ``"mp"`` in ModelOpt's sparsity registry; a no-op when it is registered (import does this)."""
    if MODE_NAME not in SparsityModeRegistry:
        SparsityModeRegistry.register_mode(MPModeDescriptor)


register()


def restore(model: nn.Module, path: str | Path) -> nn.Module:
    """``mto.restore`` for a model saved after ``mode="mp"`` (this module registers the mode first).

    The plan comes back with the ModelOpt state: read it with :func:`plan_of`.
    """
    import modelopt.torch.opt as mto

    return mto.restore(model, str(path))
