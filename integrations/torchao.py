"""torchao adapter: ``torchao.sparsity.sparsify_(model, MPSparsifier())`` and ``torchao.quantize_``.

torchao calls a config's handler one module at a time, with neither the module's
name nor the model. The adapter therefore has two routes, and never looks beyond
the module it is handed:

* **The literal line** ``torchao.sparsity.sparsify_(model, MPSparsifier())``: with a
  k:n pattern (default 2:4) and the magnitude projection, each layer's mask is decided
  by that layer alone, so the handler plans and prunes every module it is handed on
  its own (on whatever device torchao has moved it to). Every layer torchao's filter
  selects is pruned, the classifier head included.
* **A whole-model plan**: budgets that compare layers (``pattern="unstructured"``,
  ``"auto"``), calibration data (CAST/OBS projections, OWL/noise-floor budgets,
  prune–restore) and channel permutation are decisions about the whole model.
  ``config = MPSparsifier.for_model(model, ..., calibration=batches)`` makes them once,
  before torchao moves or touches anything, and returns a config holding the
  :class:`~mp_plugin.PrunePlan` as plain JSON data; the handler then applies each
  module's part of the plan, finding the module's name by its identity (recorded by
  ``for_model`` / :meth:`MPSparsifier.bind`). Settings whose application itself needs
  the whole model (projections other than magnitude, restore, permutation) are applied
  by ``for_model``; the handler then only checks and converts each module.

The config holds no tensors or modules, so torchao's ``config_to_dict`` /
``config_from_dict`` round-trip it (importing this module registers it with
``torchao.core.config.ALLOWED_AO_MODULES``); a config loaded elsewhere is attached to
a model with ``config.bind(model)``. ``torchao.quantize_(model, FqnToConfig({...}))``
prunes only the modules it names (a parameter key such as ``"blk.weight"`` only that
module's own weight, not its children's). When a planned module fails (also one the
plan does not know, e.g. replaced after planning), every module this plan changed is
put back before the error is raised, those of earlier successful calls with the same
plan included. The literal line (no plan) prunes module by module as torchao hands
them over, so a failure part-way leaves the modules before it pruned: plan with
``MPSparsifier.for_model`` for all or nothing. torchao 0.18 is the
last release with ``torchao.sparsity``; ``torchao.quantize_`` takes the same handler.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

import torch
from torch import nn

try:
    from torchao.core.config import ALLOWED_AO_MODULES, AOBaseConfig
    from torchao.quantization.transform_module import register_quantize_module_handler
except ImportError as exc:  # pragma: no cover - exercised only without torchao
    raise ImportError("mp_plugin.integrations.torchao needs torchao: pip install 'mp-plugin[torchao]'") from exc

from mp_plugin.integrations.torchao_state import (  # noqa: F401 - the adapter's state lives there
    _BOUND,
    _DECIDED,
    _Binding,
    _Holder,
    _one_layer_plan,
    _plan_key,
    _put_back_state,
    _refuse_converted,
    _roll_back_models_holding,
)
from mp_plugin.integrations.torchao_targets import FilterFn, reached_layers

from mp_plugin.budget.rules import BUDGET_METHODS, check_sparsity
from mp_plugin.errors import ConfigError, MPPluginError, NoPrunableLayersError, PlanMismatchError
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.layers.patterns import Pattern
from mp_plugin.planning.build import LayerPlan, PlanConfig, PrunePlan, plan, split_method
from mp_plugin.pruning.apply_plan import MASK_METHODS, apply, default_projection, sparsity_report
from mp_plugin.pruning.checks import PERMUTE_VALUES
from mp_plugin.restore import resolve_restore

__all__ = ["MPSparsifier", "convert_module"]


def _plain(data: Any) -> Any:
    """JSON-plain copy (lists, not tuples; numbers, not numpy scalars), as torchao's encoder needs."""
    return json.loads(json.dumps(data, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


@dataclass
class MPSparsifier(AOBaseConfig):
    """torchao config for Marchenko–Pastur pruning; plain data only.

    Attributes:
        sparsity: global fraction of target weights to remove (the k:n
            projection's unstructured guide when ``pattern`` is k:n).
        pattern: ``"2:4"`` (default), another ``"k:n"``, ``"unstructured"`` or ``"auto"``.
        budget: budget method, a key of ``mp_plugin.budget.rules.BUDGET_METHODS`` (default None:
            ``mp_plugin.budget.rules.default_budget(restore)``, i.e. ``DEFAULT_BUDGET``, or
            ``DEFAULT_RESTORE_BUDGET`` with ``restore``; the paper's rule is ``"seb"``).
        permute: ``None``, ``"swap"`` or ``"interleave"``: channel permutation
            folded into the weights before k:n masking (needs :meth:`for_model`).
        accelerate: on CUDA, turn 2:4 Linear weights into
            ``torch.sparse.SparseSemiStructuredTensor`` (cuSPARSELt/CUTLASS); on CPU, or for
            a shape the kernels refuse, the layer stays dense-with-zeros.
        plan_config: a :class:`mp_plugin.PlanConfig` or its ``to_dict()`` (kept as the dict).
        projection: mask projection, ``"magnitude"``, ``"cast"`` (covariance-aware),
            ``"obs"`` or ``"cast-obs"`` (Hessian-aware); all but magnitude need
            :meth:`for_model` with ``calibration``. None (default): ``apply``'s default,
            ``"cast-obs"`` with ``restore``, else ``"magnitude"``.
        restore: ``True``, a :class:`mp_plugin.restore.RestoreConfig` or its dict (kept as the
            dict): re-solve the kept weights on calibration data after masking; needs
            :meth:`for_model` with ``calibration``.
        plan: a :class:`mp_plugin.PrunePlan` or its ``to_dict()`` (kept as the dict); set by
            :meth:`for_model`. With a plan, ``sparsity``/``pattern``/``budget`` are the plan's.
        method: deprecated: ``"cast"`` meant ``budget="seb", projection="cast"``, any
            other value was the budget (DeprecationWarning).
        calibration: not stored; giving it raises :class:`~mp_plugin.ConfigError` that
            points to :meth:`for_model`.
    """

    sparsity: float = 0.5
    pattern: str = "2:4"
    budget: str | None = None
    permute: str | None = None
    accelerate: bool = False
    plan_config: dict | None = None
    projection: str | None = None
    restore: bool | dict = False
    plan: dict | None = field(default=None, repr=False)
    method: str | None = None
    calibration: InitVar[Any] = None

    def __post_init__(self, calibration: Any = None) -> None:
        if calibration is not None:
            raise ConfigError(
                "MPSparsifier holds plain data only (torchao serialises it with config_to_dict); give the "
                "calibration batches to MPSparsifier.for_model(model, calibration=batches, ...)"
            )
        self.budget, self.projection = split_method(
            self.budget, self.projection, self.method, "MPSparsifier", self.restore
        )
        self.method = None
        if self.projection is None:  # apply's default: cast-obs with restore, else magnitude
            self.projection = default_projection(self.restore)
        if self.projection not in MASK_METHODS:
            raise ConfigError(f"unknown projection {self.projection!r}; use one of {MASK_METHODS}")
        self._check_fields()
        if isinstance(self.plan_config, PlanConfig):
            self.plan_config = _plain(self.plan_config.to_dict())
        elif self.plan_config is not None:
            self.plan_config = _plain(self._plan_config().to_dict())  # validates a dict
        restore = resolve_restore(self.restore)
        if restore is not None and self.restore is not True:
            self.restore = _plain(restore.to_dict())
        if isinstance(self.plan, PrunePlan):
            self.plan = _plain(self.plan.to_dict())
        if self.plan is not None:
            the_plan = PrunePlan.from_dict(self.plan)  # PlanFormatError for a malformed plan
            self.plan = _plain(self.plan)
            self.sparsity, self.pattern, self.budget = the_plan.sparsity, the_plan.pattern, the_plan.method

    def _check_fields(self) -> None:
        """Refuse bad values here, not when torchao first calls the handler."""
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ConfigError(f"MPSparsifier.sparsity must be a number in [0, 1), got {self.sparsity!r}")
        check_sparsity(self.sparsity)
        if not isinstance(self.pattern, str):
            raise ConfigError(f"MPSparsifier.pattern must be a string, got {self.pattern!r}")
        if self.pattern != "auto":
            Pattern.parse(self.pattern)  # PatternError for "3:2", "dense", ...
        if self.budget is not None and self.budget not in BUDGET_METHODS:
            raise ConfigError(f"unknown budget {self.budget!r}; use one of {sorted(BUDGET_METHODS)}")
        if self.permute not in PERMUTE_VALUES:
            raise ConfigError(f"MPSparsifier.permute must be None, 'swap' or 'interleave', got {self.permute!r}")
        if not isinstance(self.accelerate, bool):
            raise ConfigError(f"MPSparsifier.accelerate must be True or False, got {self.accelerate!r}")
        if self.plan_config is not None and not isinstance(self.plan_config, (dict, PlanConfig)):
            raise ConfigError(f"MPSparsifier.plan_config must be a PlanConfig or its dict, got {self.plan_config!r}")

    # ------------------------------------------------------------------ API
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        filter_fn: FilterFn | None = None,
        fqn_to_config: Any = None,
        calibration: Any = None,
        **settings: Any,
    ) -> MPSparsifier:
        """Plan for the whole ``model`` now and return a config holding the plan, bound to ``model``.

        Call it before ``sparsify_``/``quantize_`` (so before torchao moves any module to
        ``device=``). With a non-magnitude ``projection``, ``restore`` or ``permute`` the
        masks (and restored weights) are applied to ``model`` here, all or nothing; otherwise
        ``model`` is not modified until torchao calls the handler.

        Args:
            model: the model torchao will convert (weights plain dense tensors).
            filter_fn: the ``filter_fn`` you will give torchao (None: its default, Linear
                layers); the plan covers the layers it hands to the handler that the plan's
                layer selection keeps: by default the classifier head stays dense (set
                ``plan_config=PlanConfig(selection=LayerSelection(exclude_head=False))`` to
                prune it). The literal line without ``for_model`` prunes the head it is handed.
            fqn_to_config: instead of ``filter_fn``, the torchao ``FqnToConfig`` (or its dict,
                or its list of keys) you will give ``quantize_``: the plan covers the weights
                it maps to an ``MPSparsifier``.
            calibration: a batch or list of batches (tensor → ``model(x)``, tuple →
                ``model(*x)``, dict → ``model(**x)``) for CAST/OBS projections, calibrated
                budgets and restore; used here and not kept.
            **settings: the config's fields (``sparsity``, ``pattern``, ``budget``, ...).

        Returns:
            A new :class:`MPSparsifier` whose ``plan`` is the plan's JSON dict.

        Raises:
            MPPluginError: converted weights, missing calibration, no prunable layer, or a
                failure while applying (the model is then left as it was).
        """
        config = cls(**settings)
        if config.plan is not None:
            raise ConfigError("for_model makes the plan itself: leave plan= out (or use MPSparsifier(plan=...))")
        _refuse_converted(model)
        whole = config._whole_model_application()
        if whole and calibration is None and (config.projection != "magnitude" or config.restore):
            raise MPPluginError(f"{whole}: MPSparsifier.for_model(model, calibration=batches, ...)")
        base = config._plan_config()
        names = reached_layers(model, filter_fn, fqn_to_config, wanted=lambda c: isinstance(c, MPSparsifier))
        own = [re.compile(p) for p in base.selection.include_only]
        names = [n for n in names if not own or any(p.search(n) for p in own)]
        selection = LayerSelection(**{**base.selection.to_dict(), "include_only": [f"^{re.escape(n)}$" for n in names]})
        if not names:
            selection.include_only = ["^$"]  # nothing reached: plan() names the empty selection
        cfg = PlanConfig(**{**base.__dict__, "selection": selection})
        the_plan = plan(model, config.sparsity, config.pattern, config.budget, cfg, calibration=calibration)
        if whole:
            kwargs: dict[str, Any] = {"projection": config.projection, "restore": config.restore}
            if calibration is not None:
                kwargs["calibration"] = calibration
            if config.permute:
                kwargs["permute"] = config.permute
            before = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()}
            try:
                apply(model, the_plan, **kwargs)
            except BaseException:
                _put_back_state(model, before)
                raise
        planned = cls(**{**config._fields(), "plan": the_plan.to_dict()})
        return planned.bind(model)

    def bind(self, model: nn.Module) -> MPSparsifier:
        """Attach this config's plan to ``model`` (validated first) so the handler knows each module's name.

        :meth:`for_model` binds already; call it for a config made with ``plan=`` or loaded
        with ``config_from_dict``. Returns ``self``.

        Raises:
            ConfigError: the config has no plan.
            PlanMismatchError: ``model`` lacks a plan layer or a shape differs.
            MPPluginError: a weight was converted by another tool.
        """
        if self.plan is None:
            raise ConfigError("bind needs a config with a plan: MPSparsifier.for_model(model, ...)")
        the_plan = PrunePlan.from_dict(self.plan)
        _refuse_converted(model)
        the_plan.check_model(model)
        binding = _Binding(the_plan, weakref.ref(model))
        key = _plan_key(self.plan)
        for name, module in model.named_modules():
            _BOUND.setdefault(module, {})[key] = (binding, name)
        return self

    def plan_for(self, model: nn.Module) -> PrunePlan | None:
        """The plan this config applies to ``model``, with what was applied (None before anything was).

        For a planned config: the bound plan (``plan.applied`` filled in as modules are
        pruned). For the literal line: the per-module decisions made so far, named by
        ``model``'s module names.
        """
        if self.plan is not None:
            entry = _BOUND.get(model, {}).get(_plan_key(self.plan))
            return None if entry is None else entry[0].plan
        key = self._settings_key()
        layers: list[LayerPlan] = []
        log: dict[str, dict] = {}
        for name, module in model.named_modules():
            decided = _DECIDED.get(module, {}).get(key)
            if decided is not None and name:
                layers.append(LayerPlan(**{**decided[0].__dict__, "name": name}))
                log[name] = decided[1]
        if not layers:
            return None
        return PrunePlan(
            self.sparsity,
            self.pattern,
            self.budget,
            layers,
            config=self._plan_config(),
            applied={"method": self.projection, "layers": log},
        )

    # ------------------------------------------------------------ internals
    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _plan_config(self) -> PlanConfig:
        return PlanConfig.from_dict(self.plan_config) if self.plan_config else PlanConfig()

    def _settings_key(self) -> str:
        return json.dumps({k: v for k, v in self._fields().items() if k != "plan"}, sort_keys=True)

    def _whole_model_application(self) -> str | None:
        """Why applying these settings needs the whole model at once (None: each layer on its own)."""
        if self.projection != "magnitude":
            return f"projection={self.projection!r} needs calibration data run through the whole model"
        if self.restore:
            return "restore needs calibration data run through the whole model"
        if self.permute:
            return f"permute={self.permute!r} folds channel permutations across neighbouring layers"
        return None

    def _whole_model_decision(self) -> str | None:
        """Why these settings need a whole-model plan (None: each layer's decision is its own)."""
        reason = self._whole_model_application()
        if reason is not None:
            return reason
        sel = self._plan_config().selection
        if sel.exclude or sel.include_only:  # torchao hands over modules without their names
            return "LayerSelection exclude/include_only match layer names, which the per-module call does not see"
        spec = BUDGET_METHODS.get(self.budget)
        if self.pattern != "auto" and Pattern.parse(self.pattern).is_kn:
            return None  # k:n magnitude masks are per layer; the budget only sets n_prune, unused here
        if self.pattern == "unstructured" and spec is not None and spec.uniform and spec.counts is None:
            return None
        return f"budget={self.budget!r} with pattern={self.pattern!r} compares layers across the model"


ALLOWED_AO_MODULES.add(__name__)  # torchao's config_from_dict looks config classes up in these modules


# --------------------------------------------------------------------------- the handler


def convert_module(module: nn.Module, config: MPSparsifier, parameter_name: str | None = None) -> nn.Module:
    """torchao's handler for :class:`MPSparsifier`: prune ``module`` (and its sub-layers) in place.

    Args:
        module: what torchao hands over (a Linear, or a whole block a filter accepted),
            on whatever device torchao has moved it to.
        config: the config; a planned one must be bound to the model that holds ``module``.
        parameter_name: set by ``FqnToConfig`` for a parameter key; only ``"weight"`` is pruned.

    Returns:
        ``module`` itself (weights pruned; 2:4 Linear weights converted with ``accelerate``).
    """
    if parameter_name not in (None, "weight"):  # FqnToConfig named a bias or other parameter: nothing to prune
        return module
    own_only = parameter_name == "weight"  # a parameter key names this module's weight, not its children's
    if config.plan is None:
        _refuse_converted(module)
        done = _apply_alone(module, config, own_only)
    else:
        try:
            _refuse_converted(module)
            done = _apply_planned(module, config, own_only)
        except BaseException:  # also a module the plan does not know: put back what this plan changed
            _roll_back_models_holding(module, config)
            raise
    if config.accelerate:
        for sub, pattern in done:
            _accelerate(sub, pattern)
    return module


def _apply_alone(module: nn.Module, config: MPSparsifier, own_only: bool = False) -> list[tuple[nn.Module, str]]:
    """The literal line: plan and prune the layers of ``module`` on their own (k:n magnitude).

    torchao calls the handler module by module, so a failure part-way leaves the modules handled
    before it pruned; plan with :meth:`MPSparsifier.for_model` for all or nothing.
    """
    reason = config._whole_model_decision()
    if reason is not None:
        raise MPPluginError(
            f"{reason}: plan the whole model first: config = MPSparsifier.for_model(model, ...), then sparsify_"
        )
    base = config._plan_config()
    chosen = {**base.selection.to_dict(), "exclude_head": False}
    if own_only:
        chosen["include_only"] = ["^m$"]
    cfg = PlanConfig(**{**base.__dict__, "selection": LayerSelection(**chosen)})
    holder = _Holder(module)
    try:
        own = plan(holder, config.sparsity, config.pattern, config.budget, cfg)
    except NoPrunableLayersError:
        return []  # nothing prunable in what torchao handed over (e.g. below min_dim)
    apply(holder, own)
    key = config._settings_key()
    done = []
    for lp in own.layers:
        sub = holder.get_submodule(lp.name)
        _DECIDED.setdefault(sub, {})[key] = (lp, own.applied["layers"][lp.name])
        done.append((sub, lp.pattern))
    return done


def _apply_planned(module: nn.Module, config: MPSparsifier, own_only: bool = False) -> list[tuple[nn.Module, str]]:
    """A planned config: apply the plan's layers inside ``module`` (only its own weight with ``own_only``);
    on failure put back what the plan changed."""
    entry = _BOUND.get(module, {}).get(_plan_key(config.plan))
    if entry is None:
        raise PlanMismatchError(
            f"this {type(module).__name__} is not part of a model the plan was made for or bound to: "
            "MPSparsifier.for_model(model, ...) or config.bind(model) before sparsify_/quantize_"
        )
    binding, name = entry
    inside = [
        lp
        for lp in binding.plan.layers
        if lp.name == name or (not own_only and (not name or lp.name.startswith(name + ".")))
    ]
    try:
        work = []
        for lp in inside:  # check all of them before touching one
            sub = module if lp.name == name else module.get_submodule(lp.name[len(name) + 1 :] if name else lp.name)
            weight = getattr(sub, "weight", None)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(lp.weight_shape):
                got = None if weight is None else tuple(weight.shape)
                raise PlanMismatchError(
                    f"layer {lp.name!r}: the plan expects weight {tuple(lp.weight_shape)}, got {got}"
                )
            work.append((lp, sub))
        done = []
        for lp, sub in work:
            if lp.pattern == "dense":
                continue
            one = _one_layer_plan(binding.plan, lp)
            holder = _Holder(sub)
            if config._whole_model_application() is not None:
                row = sparsity_report(holder, one).layers[0]
                # a k:n layer is done when its pattern holds (n_prune is the budget before pattern rounding)
                if row.kn_valid is False or (row.kn_valid is None and row.zeros < lp.n_prune):
                    raise MPPluginError(
                        f"layer {lp.name!r} is not pruned yet and {config._whole_model_application()}: "
                        "MPSparsifier.for_model(model, calibration=..., ...) applies it"
                    )
            elif lp.name in binding.pending and lp.name not in binding.backups:
                binding.backups[lp.name] = (weakref.ref(sub), sub.weight, sub.weight.detach().to("cpu", copy=True))
            apply(holder, one)
            binding.plan.applied.setdefault("layers", {})[lp.name] = one.applied["layers"]["m"]
            binding.pending.discard(lp.name)
            done.append((sub, lp.pattern))
    except BaseException:
        binding.roll_back()
        raise
    if not binding.pending:
        binding.backups.clear()  # the whole plan is applied: nothing left to roll back to
    return done


def _accelerate(module: nn.Module, pattern: str) -> None:
    """2:4 Linear weight on CUDA → ``SparseSemiStructuredTensor``; a shape the kernels refuse stays dense."""
    weight = getattr(module, "weight", None)
    if pattern != "2:4" or not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor):
        return
    if not weight.is_cuda or type(weight) is not nn.Parameter:
        return
    from torch.sparse import to_sparse_semi_structured

    try:
        sparse = to_sparse_semi_structured(weight.detach())
    except (RuntimeError, ValueError):
        return  # e.g. rows/columns not a multiple of the kernel tile: dense-with-zeros is still exact
    module.weight = nn.Parameter(sparse, requires_grad=False)


register_quantize_module_handler(MPSparsifier)(convert_module)
