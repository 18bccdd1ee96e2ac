"""The prune plan: what to prune where, decided before anything is applied.

``plan(model, sparsity, pattern, budget)`` fits MP to every target layer,
computes budgets, rounds them to deployable patterns and returns a
:class:`PrunePlan`. The plan is plain data: it saves to versioned JSON, loads
back, prints as a table and plots. Applying it (``mp_plugin.apply``),
exporting and certifying are separate steps that read it.

The module is ``mp_plugin.planning.build``; ``mp_plugin.plan`` is the function. The
old module path still imports (``from mp_plugin.plan import PrunePlan``,
``importlib.import_module("mp_plugin.plan")``): it is an alias of this module.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mp_plugin.budget.bounded import BoundedConfig  # importing it registers alpha, bounded-*, owl, noise-floor
from mp_plugin.budget.mix import DEPLOYABLE_MIX, MIX_RULES, choose_kn_layers, mix_order
from mp_plugin.budget.rules import BUDGET_METHODS, DEFAULT_BUDGET, BudgetContext, SEBConfig
from mp_plugin.errors import (
    ConfigError,
    MPPluginError,
    NoPrunableLayersError,
    PatternError,
    PlanFormatError,
    PlanMismatchError,
)
from mp_plugin.layers.discovery import LayerSelection, TargetLayer, find_target_layers
from mp_plugin.layers.patterns import Pattern, round_budget_to_pattern
from mp_plugin.masks.counts import check_sparsity, global_prune_counts, uniform_prune_counts
from mp_plugin.planning.schema import check_plan_dict
from mp_plugin.spectrum import SpectralFit
from mp_plugin.spectrum.analysis import LayerWeights, fit_target_layers
from mp_plugin.spectrum.eigen import resolve_gram_dtype
from mp_plugin.spectrum.fit import check_fit_options

__all__ = ["PlanConfig", "LayerPlan", "PrunePlan", "plan", "split_method", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class PlanConfig:
    """Settings of :func:`plan` beyond sparsity/pattern/method.

    Attributes:
        alpha, beta: BEMA window trim and TW confidence (ALGORITHM.md §1.2).
        estimator: ``"bema-debiased"`` (default) or the authors' ``"bema"``.
        edge_compat: ``"correct"`` TW exponent or the authors' ``"authors"`` typo.
        seb: :class:`SEBConfig` for the ``seb``/``seb-hill`` methods.
        selection: :class:`LayerSelection` (which layers are targets).
        auto_patterns: candidates for ``pattern="auto"`` rounding.
        gram_dtype: ``"float32"`` (default) or ``"float64"``, the precision of the Gram
            product and eigen-solve (see :func:`mp_plugin.spectrum.fit_many`).
        float32_sigma_rtol: with float32, a layer whose estimated σ̂ error exceeds this
            relative tolerance is refitted in float64 (None: never).
        bounded: :class:`~mp_plugin.budget.bounded.BoundedConfig` for the bounded budgets
            (``alpha``, ``bounded-*``, ``owl``, ``noise-floor``).
        mix_rule: with ``pattern="auto"``, ``auto_patterns=("dense", "2:4")`` and s < 0.5,
            how the layers that take 2:4 are chosen (:data:`mp_plugin.budget.mix.MIX_RULES`;
            ``"round"`` = round each budget to the nearest pattern instead).
        mix_scores: per-layer scores for ``mix_rule="scores"`` (lower → 2:4 first).
        mix_costs: per-layer cost the mix target counts (default: weights; e.g. dense
            MACs for equal sparse-execution MACs).
    """

    alpha: float = 0.25
    beta: float = 0.8
    estimator: str = "bema-debiased"
    edge_compat: str = "correct"
    seb: SEBConfig = field(default_factory=SEBConfig)
    selection: LayerSelection = field(default_factory=LayerSelection)
    auto_patterns: tuple[str, ...] = ("dense", "12:16", "2:4")
    gram_dtype: str = "float32"
    float32_sigma_rtol: float | None = 1e-6
    bounded: BoundedConfig = field(default_factory=BoundedConfig)
    mix_rule: str = "mp"
    mix_scores: dict[str, float] | None = None
    mix_costs: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bounded, BoundedConfig):
            raise ConfigError(f"bounded must be a BoundedConfig, got {type(self.bounded).__name__}")
        if self.mix_rule not in MIX_RULES:
            raise ConfigError(f"mix_rule must be one of {MIX_RULES}, got {self.mix_rule!r}")
        check_fit_options(self.alpha, self.beta, self.estimator, self.edge_compat)
        self.gram_dtype = str(resolve_gram_dtype(self.gram_dtype)).removeprefix("torch.")
        rtol = self.float32_sigma_rtol
        if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < 1):
            raise ConfigError(f"float32_sigma_rtol must be None or a number in (0, 1), got {rtol!r}")
        if not isinstance(self.seb, SEBConfig):
            raise ConfigError(f"seb must be an SEBConfig, got {type(self.seb).__name__}")
        if not isinstance(self.selection, LayerSelection):
            raise ConfigError(f"selection must be a LayerSelection, got {type(self.selection).__name__}")
        if isinstance(self.auto_patterns, str) or not all(isinstance(p, str) for p in self.auto_patterns):
            raise ConfigError(f"auto_patterns must be a tuple of pattern strings, got {self.auto_patterns!r}")
        self.auto_patterns = tuple(self.auto_patterns)
        for text in self.auto_patterns:
            Pattern.parse(text)

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "estimator": self.estimator,
            "edge_compat": self.edge_compat,
            "seb": self.seb.to_dict(),
            "selection": self.selection.to_dict(),
            "auto_patterns": list(self.auto_patterns),
            "gram_dtype": self.gram_dtype,
            "float32_sigma_rtol": self.float32_sigma_rtol,
            "bounded": self.bounded.to_dict(),
            "mix_rule": self.mix_rule,
            "mix_scores": self.mix_scores,
            "mix_costs": self.mix_costs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PlanConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["seb"] = SEBConfig.from_dict(d.get("seb", {}))
        d["selection"] = LayerSelection(**d.get("selection", {}))
        d["auto_patterns"] = tuple(d.get("auto_patterns", ("dense", "12:16", "2:4")))
        d["bounded"] = BoundedConfig.from_dict(d.get("bounded", {}))
        return cls(**d)


@dataclass
class LayerPlan:
    """The decision for one layer.

    Attributes:
        name: qualified module name.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        layer_type: ``"attn"``, ``"mlp"`` or ``"other"``.
        shape: (C_out, C_in·kh·kw).
        weight_shape: the parameter's own shape.
        numel: number of weights.
        fit: the MP fit (None when the fit is undefined; ``note`` says why).
        z: standardised signal; w: SEB layer weight w_ℓ (1 = neutral).
        unstructured_budget: fraction of weights the global threshold removes here.
        n_prune: exact count behind ``unstructured_budget``.
        pattern: ``"dense"``, ``"unstructured"`` or ``"k:n"`` to apply.
        sparsity: fraction of zeros the pattern leaves (k:n → 1 − k/n).
        note: free text (ineligible pattern, failed fit, …).
    """

    name: str
    kind: str
    layer_type: str
    shape: tuple[int, int]
    weight_shape: tuple[int, ...]
    numel: int
    fit: SpectralFit | None
    z: float
    w: float
    unstructured_budget: float
    n_prune: int
    pattern: str
    sparsity: float
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = {k: v for k, v in asdict(self).items() if k != "fit"}
        d["shape"] = list(self.shape)
        d["weight_shape"] = list(self.weight_shape)
        d["fit"] = self.fit.to_dict(with_singular_values=True) if self.fit is not None else None
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> LayerPlan:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["weight_shape"] = tuple(d["weight_shape"])
        d["fit"] = SpectralFit.from_dict(d["fit"]) if d.get("fit") else None
        d["z"] = float("nan") if d.get("z") is None else d["z"]
        return cls(**d)


@dataclass
class PrunePlan:
    """Per-layer pruning decisions for one model; the contract between deciding and applying.

    Attributes:
        sparsity: requested global unstructured sparsity.
        pattern: requested pattern (``"unstructured"``, ``"k:n"``, ``"auto"``).
        method: budget method name (see ``mp_plugin.budget.rules.BUDGET_METHODS``).
        layers: one :class:`LayerPlan` per target layer, in module order.
        skipped: ``{"name", "reason"}`` for each Linear/Conv left out.
        config: the :class:`PlanConfig` used.
        model_name: free text naming the model.
        applied: what ``apply`` recorded (permutations, calibration, …).
    """

    sparsity: float
    pattern: str
    method: str
    layers: list[LayerPlan]
    skipped: list[dict] = field(default_factory=list)
    config: PlanConfig = field(default_factory=PlanConfig)
    model_name: str = ""
    created: str = ""
    applied: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ queries
    def layer(self, name: str) -> LayerPlan:
        """The :class:`LayerPlan` named ``name``."""
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the plan")

    @property
    def total_weights(self) -> int:
        """Number of weights in the target layers."""
        return sum(lp.numel for lp in self.layers)

    @property
    def planned_sparsity(self) -> float:
        """Fraction of target weights the planned patterns set to zero."""
        total = self.total_weights
        if self.pattern in ("unstructured",):
            return sum(lp.n_prune for lp in self.layers) / total
        return sum(lp.sparsity * lp.numel for lp in self.layers) / total

    # -------------------------------------------------------------- serialise
    def to_dict(self) -> dict:
        """JSON-ready dict (versioned schema)."""
        return {
            "schema_version": self.schema_version,
            "created": self.created,
            "model_name": self.model_name,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "method": self.method,
            "config": self.config.to_dict(),
            "layers": [lp.to_dict() for lp in self.layers],
            "skipped": self.skipped,
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        """Inverse of :meth:`to_dict`; rejects unknown schema versions and malformed plans (PlanFormatError)."""
        return cls._from_dict(d, "plan")

    @classmethod
    def _from_dict(cls, d: Any, source: str) -> PrunePlan:
        layer_fields = {f.name: f.default is MISSING and f.default_factory is MISSING for f in fields(LayerPlan)}
        check_plan_dict(d, source, SCHEMA_VERSION, {f.name for f in fields(cls)}, layer_fields)
        layers = []
        for x in d["layers"]:
            try:
                layers.append(LayerPlan.from_dict(x))
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                raise PlanFormatError(f"{source}: layer {x.get('name')!r}: malformed 'fit' ({exc})") from exc
        try:
            config = PlanConfig.from_dict(d.get("config", {}))
        except MPPluginError as exc:
            raise PlanFormatError(f"{source}: 'config': {exc}") from exc
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise PlanFormatError(f"{source}: 'config' is malformed ({type(exc).__name__}: {exc})") from exc
        return cls(
            sparsity=float(d["sparsity"]),
            pattern=d["pattern"],
            method=d["method"],
            layers=layers,
            skipped=list(d.get("skipped", [])),
            config=config,
            model_name=d.get("model_name", ""),
            created=d.get("created", ""),
            applied=dict(d.get("applied", {})),
            schema_version=d["schema_version"],
        )

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to ``path`` and return the path."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"cannot write the plan to {path}: it is a directory (give a file name such as plan.json)"
            )
        if any(p.exists() and not p.is_dir() for p in path.parents):
            raise ConfigError(f"cannot write the plan to {path}: a parent path is an existing file")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        """Read a plan written by :meth:`save`.

        Raises:
            PlanFormatError: the file is missing, unreadable, not UTF-8 JSON, or does not
                follow the plan schema; the message names the file and the field.
        """
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = (
                "is not UTF-8 text"
                if isinstance(exc, UnicodeDecodeError)
                else f"cannot be read ({exc.strerror or exc})"
            )
            raise PlanFormatError(f"plan file {path} {why}: give a plan written by PrunePlan.save") from exc
        if not text.strip():
            raise PlanFormatError(f"plan file {path} is empty: give a plan written by PrunePlan.save")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PlanFormatError(f"plan file {path} is not valid JSON ({exc}); is it truncated?") from exc
        return cls._from_dict(data, f"plan file {path}")

    # ---------------------------------------------------------------- display
    def to_table(self, max_rows: int | None = None) -> str:
        """A fixed-width text table: one row per layer plus a total line (``max_rows`` ≥ 0 or None = all)."""
        _check_max_rows(max_rows)
        head = f"{'layer':<42} {'type':<5} {'shape':>11} {'σ₊':>8} {'spk':>4} {'bulk%':>6} {'μ':>6} {'w':>5} {'budget':>7} {'pattern':>12}"
        rows = [head, "-" * len(head)]
        layers = self.layers if max_rows is None else self.layers[:max_rows]
        for lp in layers:
            f = lp.fit
            sp = f"{f.sigma_plus:8.3f}" if f else f"{'-':>8}"
            spk = f"{f.n_spikes:4d}" if f else f"{'-':>4}"
            bulk = f"{100 * f.bulk_fraction:6.1f}" if f else f"{'-':>6}"
            mu = f"{f.fit_error:6.3f}" if f and math.isfinite(f.fit_error) else f"{'-':>6}"
            shape = f"{lp.shape[0]}×{lp.shape[1]}"
            name = lp.name if len(lp.name) <= 42 else "…" + lp.name[-41:]
            rows.append(
                f"{name:<42} {lp.layer_type:<5} {shape:>11} {sp} {spk} {bulk} {mu} {lp.w:5.2f} "
                f"{lp.unstructured_budget:7.3f} {lp.pattern:>12}"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append(f"… {len(self.layers) - max_rows} more layers")
        rows.append("-" * len(head))
        rows.append(
            f"{len(self.layers)} layers, {self.total_weights:,} weights; method={self.method} "
            f"pattern={self.pattern} requested s={self.sparsity:.3f} planned s={self.planned_sparsity:.4f}"
        )
        if self.skipped:
            rows.append(f"{len(self.skipped)} Linear/Conv layers skipped (see plan.skipped)")
        restore = self.restore_table(max_rows)
        return "\n".join(rows) + ("\n\n" + restore if restore else "")

    def restore_table(self, max_rows: int | None = None) -> str:
        """Per-layer relative reconstruction error ‖(Ŵ−W)Xᵀ‖²/‖WXᵀ‖² on the calibration rows,
        masked → restored, as recorded by ``apply(..., restore=...)`` ("" when nothing was restored)."""
        layers = self.applied.get("layers", {}) if isinstance(self.applied, dict) else {}
        done = [
            (n, e["restore"]) for n, e in layers.items() if isinstance(e, dict) and isinstance(e.get("restore"), dict)
        ]
        if not done:
            return ""
        head = f"{'restored layer':<42} {'mask':>10} {'err masked':>11} {'err restored':>13} {'solver':>8} {'rows':>7}"
        out = [head, "-" * len(head)]

        def num(value: Any) -> str:
            return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

        for name, rec in done if max_rows is None else done[:max_rows]:
            short = name if len(name) <= 42 else "…" + name[-41:]
            method = str(layers[name].get("method", ""))[:10]
            out.append(
                f"{short:<42} {method:>10} {num(rec.get('rel_error_before', '-')):>11} "
                f"{num(rec.get('rel_error_after', '-')):>13} {str(rec.get('solver', '')):>8} {str(rec.get('rows', '')):>7}"
            )
            notes = rec.get("notes", [])
            for note in notes if isinstance(notes, list) else [notes]:
                out.append(f"    note: {note}")
        if max_rows is not None and len(done) > max_rows:
            out.append(f"… {len(done) - max_rows} more restored layers")
        cfg = self.applied.get("restore")
        cfg = cfg if isinstance(cfg, dict) else {}
        out.append("-" * len(head))
        out.append(
            f"{len(done)} layers restored (damp={cfg.get('damp')}, solver={cfg.get('solver')}, "
            f"sequential={cfg.get('sequential')}); errors are relative output errors on the calibration rows"
        )
        return "\n".join(out)

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """Map plan layer names to ``model``'s modules, or raise :class:`PlanMismatchError`."""
        modules = dict(model.named_modules())
        out = {}
        for lp in self.layers:
            mod = modules.get(lp.name)
            weight = getattr(mod, "weight", None)
            if mod is None or weight is None:
                raise PlanMismatchError(f"the model has no layer {lp.name!r} from the plan")
            if tuple(weight.shape) != tuple(lp.weight_shape):
                raise PlanMismatchError(
                    f"layer {lp.name!r}: plan expects weight {tuple(lp.weight_shape)}, model has {tuple(weight.shape)}"
                )
            out[lp.name] = mod
        return out


def _check_max_rows(max_rows: Any) -> None:
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
        raise ConfigError(f"max_rows must be a non-negative integer or None, got {max_rows!r}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _fit_layers(
    targets: list[TargetLayer],
    cfg: PlanConfig,
    show_progress: bool,
    reuse: PrunePlan | None = None,
    distributed: bool = False,
) -> tuple[list, list[str]]:
    """Fit every target in bounded work units (``mp_plugin.spectrum.analysis``); undefined fits become None with a note."""
    kept = {t.name: tuple(t.weight.shape) for t in targets}
    old = {
        lp.name: lp.fit
        for lp in (reuse.layers if reuse is not None else [])
        if lp.fit is not None and kept.get(lp.name) == tuple(lp.weight_shape)
    }
    return fit_target_layers(
        targets,
        cfg.alpha,
        cfg.beta,
        cfg.estimator,
        cfg.edge_compat,
        cfg.gram_dtype,
        cfg.float32_sigma_rtol,
        show_progress=show_progress,
        reuse=old,
        distributed=distributed,
    )


PROJECTIONS = ("magnitude", "cast")  # k:n projections an adapter's old ``method`` could name


def split_method(budget: str, projection: str, method: str | None, who: str) -> tuple[str, str]:
    """Resolve an adapter's deprecated ``method`` into ``(budget, projection)``.

    The adapters' old ``method`` meant both: ``"cast"`` was SEB budgets plus the CAST
    projection, any other value the budget method. ``budget="cast"`` (the old value
    passed positionally) is read the same way. Both emit a DeprecationWarning.
    """
    if method is None and budget != "cast":
        return budget, projection
    old = method if method is not None else budget
    warnings.warn(
        f"{who}(method=...) is deprecated: use budget=... (seb, seb-hill, magnitude, uniform) and "
        "projection=... (magnitude, cast)",
        DeprecationWarning,
        stacklevel=3,
    )
    return ("seb", "cast") if old == "cast" else (old, projection)


def _choose_mix(targets: list[TargetLayer], fits: list, budgets: list[float], s: float, cfg: PlanConfig) -> list[bool]:
    """The dense/2:4 mix of :mod:`mp_plugin.budget.mix` for ``cfg.mix_rule``: True = the layer takes 2:4."""
    names = [t.name for t in targets]
    weights = [t.weight for t in targets]
    costs = [float((cfg.mix_costs or {}).get(n, w.numel())) for n, w in zip(names, weights)]
    keys = mix_order(cfg.mix_rule, weights, fits, names, budgets, cfg.mix_scores, costs)
    kn = Pattern.parse("2:4")
    eligible = [kn.eligible(tuple(w.shape)) for w in weights]
    return [bool(x) for x in choose_kn_layers(keys, costs, eligible, s)]


def plan(
    model: nn.Module,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    budget: str = DEFAULT_BUDGET,
    config: PlanConfig | None = None,
    model_name: str = "",
    show_progress: bool = False,
    reuse_fits: PrunePlan | None = None,
    *,
    method: str | None = None,
    distributed: bool = False,
    calibration: Any = None,
) -> PrunePlan:
    """Fit MP to each target layer of ``model`` and decide per-layer budgets and patterns.

    Args:
        model: any ``nn.Module``; weights may be on CPU or CUDA, any float dtype.
        sparsity: global fraction s ∈ [0, 1) of target weights to remove
            (for k:n patterns, the unstructured budget that guides the projection).
        pattern: ``"unstructured"``, a k:n string such as ``"2:4"`` (every
            eligible layer takes it, the rest stay dense), or ``"auto"``
            (round each layer's budget to the nearest of ``config.auto_patterns``;
            with ``auto_patterns=("dense", "2:4")`` and s < 0.5, the deployable mix:
            ``config.mix_rule`` picks the layers that take 2:4, see :mod:`mp_plugin.budget.mix`).
        budget: the budget method, a key of ``mp_plugin.budget.rules.BUDGET_METHODS``
            (``"magnitude"``, ``"uniform"``, ``"seb"``, ``"seb-hill"``, ``"alpha"``,
            ``"bounded-bulk-energy"``, ``"bounded-spikes"``, ``"bounded-edge"``, and with
            calibration ``"owl"`` and ``"noise-floor"``); default
            :data:`mp_plugin.budget.rules.DEFAULT_BUDGET`.
        config: :class:`PlanConfig`.
        model_name: recorded in the plan.
        show_progress: show a tqdm bar over layers.
        reuse_fits: a plan of the same, unchanged weights: its MP fits are reused for
            layers of equal name and shape instead of being recomputed.
        method: deprecated name of ``budget`` (DeprecationWarning).
        distributed: layer-parallel analysis under ``torchrun``: every rank of the
            initialised ``torch.distributed`` default group calls ``plan`` on its full
            copy of the model, fits a share of the layers, and all ranks get the same
            plan (see :mod:`mp_plugin.spectrum.analysis`).
        calibration: a batch or list of batches, for budget methods that need data
            (``"owl"``, ``"noise-floor"``); not stored in the plan.

    Returns:
        A :class:`PrunePlan`. Nothing in ``model`` is modified.

    Raises:
        InvalidSparsityError, PatternError, NoPrunableLayersError, InvalidWeightError.
    """
    if method is not None:
        warnings.warn("plan(method=...) is deprecated: use budget=...", DeprecationWarning, stacklevel=2)
        budget = method
    method = budget
    cfg = config or PlanConfig()
    s = check_sparsity(sparsity)
    if not isinstance(method, str) or method not in BUDGET_METHODS:
        hint = (
            "; 'cast' is a k:n projection, not a budget: plan with a budget method, then apply(..., projection='cast')"
            if method in ("cast", "obs", "cast-obs")
            else ""
        )
        raise ConfigError(f"unknown budget method {method!r}; known: {sorted(BUDGET_METHODS)}{hint}")
    if not isinstance(cfg, PlanConfig):
        raise ConfigError(f"config must be a PlanConfig, got {type(cfg).__name__}")
    if not isinstance(pattern, (str, Pattern)):
        raise PatternError(f"pattern must be a string ('unstructured', 'auto' or k:n such as '2:4'), got {pattern!r}")
    pat = None if pattern == "auto" else Pattern.parse(pattern)
    if pat is not None and pat.kind == "dense":
        raise PatternError(f"pattern {pattern!r} prunes nothing; use 'unstructured', 'auto' or a k:n pattern")
    targets, skipped = find_target_layers(model, cfg.selection)
    if not targets:
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no prunable Linear/Conv layer under the selection rules"
            + (f" ({len(skipped)} skipped: {skipped[0].name}: {skipped[0].reason}, …)" if skipped else "")
        )
    fits, notes = _fit_layers(targets, cfg, show_progress, reuse_fits, distributed)
    types = [t.layer_type for t in targets]
    spec = BUDGET_METHODS[method]
    weights = [t.weight for t in targets]
    if spec.counts is not None:
        if spec.needs_calibration and calibration is None:
            raise ConfigError(f"budget method {method!r} needs calibration data: plan(..., calibration=batches)")
        ctx = BudgetContext(
            names=[t.name for t in targets],
            weights=weights,
            numels=[int(t.weight.numel()) for t in targets],
            layer_types=types,
            fits=list(fits),
            sparsity=s,
            options=cfg,
            model=model,
            calibration=calibration,
        )
        counts, w, z = spec.counts(ctx)
    else:
        w, z = spec.weights(fits, types, s, cfg.seb)
        layer_weights = LayerWeights(targets)  # accelerate-offloaded weights are read one layer at a time
        counts = uniform_prune_counts(weights, s) if spec.uniform else global_prune_counts(layer_weights, w, s)
    mix = None
    if pat is None and set(cfg.auto_patterns) == set(DEPLOYABLE_MIX) and s < 0.5 and cfg.mix_rule != "round":
        mix = _choose_mix(targets, fits, [c / int(t.weight.numel()) for t, c in zip(targets, counts)], s, cfg)
    layers = []
    for i, (t, f, note, wl, zl, c) in enumerate(zip(targets, fits, notes, w, z, counts)):
        numel = int(t.weight.numel())
        budget = c / numel
        if mix is not None:
            lp_pat = Pattern.parse("2:4") if mix[i] else Pattern("dense")
            c = numel // 2 if mix[i] else 0
            budget = c / numel
        elif pat is None:
            lp_pat = round_budget_to_pattern(budget, tuple(t.weight.shape), cfg.auto_patterns)
        elif pat.is_kn and not pat.eligible(tuple(t.weight.shape)):
            lp_pat = Pattern("dense")
            note = (
                note + "; " if note else ""
            ) + f"input channels {t.weight.shape[1]} not divisible by {pat.n}: kept dense"
        else:
            lp_pat = pat
        sparsity_l = budget if lp_pat.kind == "unstructured" else float(lp_pat.sparsity)
        layers.append(
            LayerPlan(
                name=t.name,
                kind=t.kind,
                layer_type=t.layer_type,
                shape=t.shape,
                weight_shape=tuple(t.weight.shape),
                numel=numel,
                fit=f,
                z=float(zl),
                w=float(wl),
                unstructured_budget=budget,
                n_prune=int(c),
                pattern=str(lp_pat),
                sparsity=sparsity_l,
                note=note,
            )
        )
    return PrunePlan(
        sparsity=s,
        pattern=str(pattern) if pat is None else str(pat),
        method=method,
        layers=layers,
        skipped=[{"name": k.name, "reason": k.reason} for k in skipped],
        config=cfg,
        model_name=model_name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
