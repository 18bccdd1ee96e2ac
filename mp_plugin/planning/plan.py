"""The prune plan as data: :class:`PlanConfig`, :class:`LayerPlan`, :class:`PrunePlan`.

A plan is plain data: it saves to versioned JSON, loads back, prints as a table
(:mod:`mp_plugin.planning.table`) and plots. :func:`mp_plugin.planning.build.plan`
builds one; applying it (``mp_plugin.apply``), exporting and certifying are
separate steps that read it.

Besides the decisions, ``PrunePlan.applied`` records what ``apply`` did, and that
record is the only place where the pruning state lives (nothing is attached to
the model, so the state survives DDP, ``torch.compile``, other wrappers and a
state_dict reload): per-layer methods and errors, the restore settings, and, for
a channel-permuted model, the permutation record under ``applied["permutation"]``
(schema version 2; see :mod:`mp_plugin.permute.record`).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mp_plugin.budget.bounded import BoundedConfig  # importing it registers alpha, bounded-*, owl, noise-floor
from mp_plugin.budget.bulk_share import BulkShareConfig  # importing it registers mp-bulk
from mp_plugin.budget.mix import mix_rules
from mp_plugin.budget.rules import SEBConfig
from mp_plugin.errors import ConfigError, MPPluginError, PlanFormatError, PlanMismatchError
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.planning.schema import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, check_plan_dict
from mp_plugin.planning.table import plan_table, restore_table
from mp_plugin.spectrum import SpectralFit
from mp_plugin.spectrum.eigen import resolve_gram_dtype
from mp_plugin.spectrum.fit import check_fit_options

__all__ = ["PlanConfig", "LayerPlan", "PrunePlan", "SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS"]


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
        bulk_share: :class:`~mp_plugin.budget.bulk_share.BulkShareConfig` for ``mp-bulk``.
        mix_rule: with ``pattern="auto"``, ``auto_patterns=("dense", "2:4")`` and 0 < s < 0.5,
            how the layers that take 2:4 are chosen (:func:`mp_plugin.budget.mix.mix_rules`).
            None (default): :func:`mp_plugin.budget.mix.default_mix_rule`, i.e. ``"measured"``
            (each layer's 2:4 damage measured on the ``calibration`` of :func:`plan`) when
            calibration is given, else ``"mp-bulk"`` (data-free); a plan that chose the mix
            records the rule it used (otherwise None stays None; an explicit rule is kept). ``"round"`` = round each
            budget to the nearest pattern instead. A plan whose chosen layers miss the target
            by more than 1 % of the cost (whole layers only) warns.
        mix_scores: per-layer damage of putting 2:4 on the layer for ``mix_rule="scores"``
            (e.g. the measured loss when only that layer is 2:4; lower → 2:4 sooner), keyed
            by target layer name; finite, or NaN for unknown (taken only when needed).
        mix_costs: per-layer cost the mix target counts (default: weights; e.g. dense
            MACs for equal sparse-execution MACs): a finite cost ≥ 0 for every target layer.
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
    bulk_share: BulkShareConfig = field(default_factory=BulkShareConfig)
    mix_rule: str | None = None
    mix_scores: dict[str, float] | None = None
    mix_costs: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bounded, BoundedConfig):
            raise ConfigError(f"bounded must be a BoundedConfig, got {type(self.bounded).__name__}")
        if not isinstance(self.bulk_share, BulkShareConfig):
            raise ConfigError(f"bulk_share must be a BulkShareConfig, got {type(self.bulk_share).__name__}")
        if self.mix_rule is not None and self.mix_rule not in mix_rules():
            raise ConfigError(f"mix_rule must be one of {mix_rules()}, got {self.mix_rule!r}")
        for key, lowest in (("mix_scores", -math.inf), ("mix_costs", 0.0)):
            values = getattr(self, key)
            if values is None:
                continue
            if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
                raise ConfigError(f"{key} must be a dict {{layer name: number}}, got {type(values).__name__}")
            for name, v in values.items():
                ok = not isinstance(v, bool) and isinstance(v, numbers.Real)
                if key == "mix_scores" and ok and math.isnan(v):
                    continue  # an unknown damage: that layer takes 2:4 only when the target needs it
                if not ok or not math.isfinite(v) or v < lowest:
                    need = "a finite number ≥ 0" if key == "mix_costs" else "a finite number (or NaN: unknown)"
                    raise ConfigError(f"{key}[{name!r}] must be {need}, got {v!r}")
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
        if not self.auto_patterns:
            raise ConfigError("auto_patterns needs at least one pattern, e.g. ('dense', '2:4')")
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
            "bulk_share": self.bulk_share.to_dict(),
            "mix_rule": self.mix_rule,
            "mix_scores": None  # NaN (unknown) as null: plan.json stays strict JSON
            if self.mix_scores is None
            else {k: None if math.isnan(v) else float(v) for k, v in self.mix_scores.items()},
            "mix_costs": None if self.mix_costs is None else {k: float(v) for k, v in self.mix_costs.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> PlanConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["seb"] = SEBConfig.from_dict(d.get("seb", {}))
        d["selection"] = LayerSelection(**d.get("selection", {}))
        d["auto_patterns"] = tuple(d.get("auto_patterns", ("dense", "12:16", "2:4")))
        d["bounded"] = BoundedConfig.from_dict(d.get("bounded", {}))
        d["bulk_share"] = BulkShareConfig.from_dict(d.get("bulk_share", {}))
        if d.get("mix_scores") is not None:
            d["mix_scores"] = {k: float("nan") if v is None else v for k, v in d["mix_scores"].items()}
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
        applied: what ``apply`` recorded: per-layer methods, restore errors, calibration
            rows and, for a channel-permuted model, ``"permutation"`` (the record
            :class:`mp_plugin.permute.PermutationRecord` reads back with ``from_plan``).
        created: ISO time the plan was made.
        schema_version: the JSON schema version (:data:`SCHEMA_VERSION`).
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

    @property
    def permutation(self) -> dict | None:
        """The JSON form of the channel permutation ``apply`` folded into the weights, or None."""
        record = self.applied.get("permutation") if isinstance(self.applied, dict) else None
        return record if record else None

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
        check_plan_dict(d, source, SUPPORTED_SCHEMA_VERSIONS, {f.name for f in fields(cls)}, layer_fields)
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
            schema_version=SCHEMA_VERSION,  # an older file is upgraded: every field it has is read
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
        return plan_table(self, max_rows)

    def restore_table(self, max_rows: int | None = None) -> str:
        """Per-layer relative reconstruction error ‖(Ŵ−W)Xᵀ‖²/‖WXᵀ‖² on the calibration rows,
        masked → restored, as recorded by ``apply(..., restore=...)`` ("" when nothing was restored)."""
        return restore_table(self, max_rows)

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """Map plan layer names to ``model``'s modules, or raise :class:`PlanMismatchError`.

        A wrapped model (``torch.compile``, DDP, …) is matched by the model inside it
        (:func:`mp_plugin.layers.wrappers.unwrap_model`), so names carry no wrapper prefix.
        """
        modules = dict(unwrap_model(model).named_modules())
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
