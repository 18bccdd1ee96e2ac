"""torchao adapter: ``torchao.sparsity.sparsify_(model, MPSparsifier())`` and ``torchao.quantize_``.

torchao calls a config's handler one module at a time, with neither the
module's name nor the model. MP budgets are whole-model decisions, so the
handler finds the model being converted (the ``model`` argument of the
``sparsify_``/``quantize_`` call on the stack, together with its
``filter_fn``), plans and applies once for the whole model on the first call,
and then only converts each matched module (2:4 layers become semi-structured
sparse tensors on CUDA when ``accelerate=True``).

No other call is needed. To decide on a different model than the one being
converted, call :meth:`MPSparsifier.calibrate` first. torchao 0.18 is the last
release with ``torchao.sparsity``; ``torchao.quantize_(model, MPSparsifier())``
takes the same handler and keeps working.
"""

from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.transform_module import register_quantize_module_handler
except ImportError as exc:  # pragma: no cover - exercised only without torchao
    raise ImportError("mp_plugin.integrations.torchao needs torchao: pip install 'mp-plugin[torchao]'") from exc

from mp_plugin import apply as mp_apply
from mp_plugin.budget.rules import DEFAULT_BUDGET
from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan, split_method

__all__ = ["MPSparsifier"]


@dataclass
class MPSparsifier(AOBaseConfig):
    """torchao config for Marchenko–Pastur pruning.

    Attributes:
        sparsity: global fraction of target weights to remove (the k:n
            projection's unstructured guide when ``pattern`` is k:n).
        pattern: ``"2:4"`` (default), another ``"k:n"``, ``"unstructured"`` or ``"auto"``.
        budget: budget method, a key of ``mp_plugin.budget.rules.BUDGET_METHODS`` (default
            ``mp_plugin.budget.rules.DEFAULT_BUDGET``; the paper's rule is ``"seb"``).
        permute: ``None``, ``"swap"`` or ``"interleave"``: channel permutation
            folded into the weights before k:n masking.
        calibration: an input batch (tensor, tuple or dict) for CAST.
        accelerate: on CUDA, turn 2:4 Linear weights into
            ``torch.sparse.SparseSemiStructuredTensor`` (cuSPARSELt/CUTLASS);
            on CPU the model stays dense-with-zeros.
        plan_config: a :class:`mp_plugin.PlanConfig` (fit and selection settings).
        projection: mask projection, ``"magnitude"``, ``"cast"`` (covariance-aware),
            ``"obs"`` or ``"cast-obs"`` (Hessian-aware); all but magnitude need ``calibration``.
        restore: ``True`` or a :class:`mp_plugin.restore.RestoreConfig`: re-solve the kept
            weights on ``calibration`` after masking (prune–restore); needs ``calibration``.
        method: deprecated: ``"cast"`` meant ``budget="seb", projection="cast"``, any
            other value was the budget (DeprecationWarning).
    """

    sparsity: float = 0.5
    pattern: str = "2:4"
    budget: str = DEFAULT_BUDGET
    permute: str | None = None
    calibration: Any = None
    accelerate: bool = False
    plan_config: PlanConfig | None = None
    projection: str = "magnitude"
    restore: Any = False
    method: str | None = None
    _roots: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._roots = weakref.WeakKeyDictionary()
        self.budget, self.projection = split_method(self.budget, self.projection, self.method, "MPSparsifier")
        self.method = None

    # ------------------------------------------------------------------ API
    def calibrate(self, model: nn.Module, filter_fn: Any = None) -> PrunePlan:
        """Plan and prune ``model`` as a whole now; later handler calls reuse the result."""
        return self._prepare(model, filter_fn)

    def plan_for(self, model: nn.Module) -> PrunePlan | None:
        """The plan used for ``model`` (None before it was sparsified)."""
        state = self._roots.get(model)
        return None if state is None else state["plan"]

    # ------------------------------------------------------------ internals
    def _selection(self, model: nn.Module, filter_fn: Any) -> PlanConfig:
        base = self.plan_config or PlanConfig()
        sel = LayerSelection(**base.selection.to_dict())
        if filter_fn is None or getattr(filter_fn, "__name__", "") == "_is_linear":
            sel.include_conv = False  # torchao's default filter matches nn.Linear only
        else:
            names = [n for n, m in model.named_modules() if n and filter_fn(m, n)]
            sel.include_only = [f"^{re.escape(n)}$" for n in names] or ["^$"]
        return PlanConfig(**{**base.__dict__, "selection": sel})

    def _prepare(self, model: nn.Module, filter_fn: Any) -> PrunePlan:
        state = self._roots.get(model)
        if state is not None:
            return state["plan"]
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter):
                raise MPPluginError(
                    f"{name}: weight is a {type(w).__name__}, already converted by another tool; "
                    "MPSparsifier needs plain dense weights"
                )
        if self.projection != "magnitude" and self.calibration is None:
            raise MPPluginError(
                f"projection={self.projection!r} needs calibration data: MPSparsifier(calibration=batch, ...)"
            )
        if self.restore and self.calibration is None:
            raise MPPluginError("restore=True needs calibration data: MPSparsifier(calibration=batch, restore=True)")
        cfg = self._selection(model, filter_fn)
        the_plan = plan(model, self.sparsity, self.pattern, self.budget, cfg, calibration=self.calibration)
        kwargs: dict[str, Any] = {"projection": self.projection, "restore": self.restore}
        if self.calibration is not None:
            kwargs["calibration"] = self.calibration
        if self.permute:
            kwargs["permute"] = self.permute
        mp_apply(model, the_plan, **kwargs)
        names = {id(m): n for n, m in model.named_modules()}
        self._roots[model] = {"plan": the_plan, "names": names}
        return the_plan

    def _root_for(self, module: nn.Module) -> nn.Module:
        for root in list(self._roots.keys()):
            if id(module) in self._roots[root]["names"]:
                return root
        frame = inspect.currentframe()
        found: tuple[nn.Module, Any] | None = None
        while frame is not None:
            code = frame.f_code
            if code.co_name in ("sparsify_", "quantize_") and "torchao" in code.co_filename:
                model = frame.f_locals.get("model")
                if isinstance(model, nn.Module):
                    filter_fn = frame.f_locals.get("filter_fn")
                    outer = frame.f_locals.get("config")
                    if filter_fn is None and outer is not self and hasattr(outer, "fqn_to_config"):
                        filter_fn = _fqn_filter(outer.fqn_to_config, self)  # FqnToConfig: only its modules
                    found = (model, filter_fn)
            frame = frame.f_back
        del frame
        if found is None:
            raise MPPluginError(
                "MPSparsifier could not see the whole model: call it through torchao.sparsity.sparsify_ "
                "or torchao.quantize_, or call MPSparsifier.calibrate(model) first"
            )
        self._prepare(*found)
        return found[0]


def _fqn_filter(mapping: dict, config: MPSparsifier) -> Any:
    """A ``filter_fn(module, fqn)`` true for the modules a torchao ``FqnToConfig`` maps to ``config``.

    A module is chosen when its ``weight`` gets ``config``. Resolution follows torchao:
    the exact parameter name (``"fc.weight"``), the exact module name, the first
    ``"re:"`` pattern that fully matches the parameter name, then the module name,
    then ``"_default"`` for Linear layers.
    """

    def chosen(module: nn.Module, fqn: str) -> bool:
        weight = f"{fqn}.weight" if fqn else "weight"
        for exact in (weight, fqn):
            if exact in mapping:
                return mapping[exact] is config
        for name in (weight, fqn):
            for key, value in mapping.items():
                if key.startswith("re:") and re.fullmatch(key[3:], name):
                    return value is config
        return mapping.get("_default") is config and isinstance(module, nn.Linear)

    chosen.__name__ = "fqn_to_config_filter"
    return chosen


def _convert_module(module: nn.Module, config: MPSparsifier, parameter_name: str | None = None) -> nn.Module:
    root = config._root_for(module)
    state = config._roots[root]
    name = state["names"].get(id(module))
    if parameter_name not in (None, "weight"):  # FqnToConfig named a bias or other parameter: nothing to prune
        return module
    if not (config.accelerate and isinstance(module, nn.Linear) and module.weight.is_cuda):
        return module
    try:
        lp = state["plan"].layer(name)
    except KeyError:
        return module  # not a planned target (e.g. the classifier head): left dense
    if lp.pattern == "2:4":
        from torch.sparse import to_sparse_semi_structured

        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return module


register_quantize_module_handler(MPSparsifier)(_convert_module)
