"""Per-layer pruning budgets: Spectral Edge Budgeting (SEB) and its baselines.

SEB (ALGORITHM.md §1.4(iii)) standardises a per-layer spectral signal (the
fitted edge σ₊, or the Hill α) into z-scores, turns them into layer weights

    w_ℓ = max(0.1, 1 + β_type(ℓ) · [1 − s/s_d]₊ · z_ℓ)

and prunes the globally smallest fraction s of the scores |W_ij|/w_ℓ. A higher
signal means a larger w_ℓ, so a higher threshold: more pruning in that layer.
β and s_d follow the regime table; below s = 0.30 SEB is plain global
magnitude. :func:`~mp_plugin.masks.counts.global_prune_counts` hits the requested count exactly.

Budget methods live in :data:`BUDGET_METHODS`, a registry keyed by name:
``"seb"``, ``"seb-hill"``, ``"magnitude"`` (global magnitude) and ``"uniform"``
here; the bounded budgets of :mod:`mp_plugin.budget.bounded` (``"alpha"``,
``"bounded-*"``, ``"mag-*"``, ``"owl"``, ``"noise-floor"``) and the SEB signal
variants of :mod:`mp_plugin.budget.signals`. :data:`DEFAULT_BUDGET` is what
``plan``, the CLI and the adapters use when no budget is named; it follows the
measurement in ``benchmarks/budgets.py`` (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mp_plugin.errors import ConfigError
from mp_plugin.masks.counts import check_sparsity, global_prune_counts, prune_target, uniform_prune_counts

__all__ = [
    "SEBConfig",
    "SEBRegime",
    "BUDGET_METHODS",
    "BudgetContext",
    "DEFAULT_BUDGET",
    "DEFAULT_RESTORE_BUDGET",
    "default_budget",
    "register_budget_method",
    "check_sparsity",
    "seb_layer_weights",
    "global_prune_counts",
    "uniform_prune_counts",
]


@dataclass(frozen=True)
class SEBRegime:
    """One row of the regime table: applies for sparsities in (lo, hi]."""

    lo: float
    hi: float
    beta: float
    s_d: float
    beta_attn: float | None = None
    beta_mlp: float | None = None

    def __post_init__(self) -> None:
        values = {"lo": self.lo, "hi": self.hi, "beta": self.beta, "s_d": self.s_d}
        values.update({k: v for k, v in (("beta_attn", self.beta_attn), ("beta_mlp", self.beta_mlp)) if v is not None})
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"SEBRegime.{name} must be a finite number, got {v!r}")
        if not 0 <= self.lo < self.hi <= 1:
            raise ConfigError(f"SEBRegime needs 0 ≤ lo < hi ≤ 1, got lo={self.lo}, hi={self.hi}")
        if self.s_d <= 0:
            raise ConfigError(f"SEBRegime.s_d must be > 0 (the decay is 1 − s/s_d), got {self.s_d}")


DEFAULT_REGIMES: tuple[SEBRegime, ...] = (
    SEBRegime(0.30, 0.40, beta=1.00, s_d=0.50),
    SEBRegime(0.40, 0.55, beta=1.25, s_d=0.70),
    SEBRegime(0.55, 1.00, beta=1.25, s_d=0.85, beta_attn=1.00, beta_mlp=2.00),
)


SEB_SIGNALS = ("sigma_plus", "hill_alpha")  # the fit attribute budget method "seb" reads (SEBConfig.signal)


@dataclass
class SEBConfig:
    """Spectral Edge Budgeting settings.

    Attributes:
        signal: ``"sigma_plus"`` (default) or ``"hill_alpha"``: the signal of budget method ``"seb"``
            (``"seb-hill"`` always uses ``"hill_alpha"``).
        regimes: the regime table; sparsities below the first row use plain
            global magnitude (all w_ℓ = 1).
        power: exponent p of the decay d(s) = [1 − s/s_d]₊^p.
        min_weight: floor of w_ℓ (0.1 in the paper).
        direction: +1 prunes high-signal layers more (the paper); −1 reverses it.
    """

    signal: str = "sigma_plus"
    regimes: tuple[SEBRegime, ...] = DEFAULT_REGIMES
    power: float = 1.0
    min_weight: float = 0.1
    direction: float = 1.0

    def __post_init__(self) -> None:
        for name, ok, need in (
            ("power", lambda v: v >= 0, "≥ 0"),
            ("min_weight", lambda v: v > 0, "> 0 (layer weights divide |W|)"),
            ("direction", lambda v: True, ""),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"SEBConfig.{name} must be a finite number{' ' + need if need else ''}, got {v!r}")
        if not self.regimes:
            raise ConfigError("SEBConfig.regimes must hold at least one regime row")
        if any(b.lo < a.hi for a, b in zip(self.regimes, self.regimes[1:])):
            raise ConfigError("SEBConfig.regimes must be in increasing, non-overlapping order of sparsity")
        if self.signal not in SEB_SIGNALS:
            raise ConfigError(f"SEBConfig.signal must be one of {SEB_SIGNALS}, got {self.signal!r}")

    def regime(self, sparsity: float) -> SEBRegime | None:
        """The regime row covering ``sparsity`` (None = plain global magnitude)."""
        if sparsity < self.regimes[0].lo:
            return None
        for row in self.regimes:
            if sparsity <= row.hi:
                return row
        return self.regimes[-1]

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return {
            "signal": self.signal,
            "power": self.power,
            "min_weight": self.min_weight,
            "direction": self.direction,
            "regimes": [r.__dict__ for r in self.regimes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SEBConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["regimes"] = tuple(SEBRegime(**r) for r in d.get("regimes", [r.__dict__ for r in DEFAULT_REGIMES]))
        return cls(**d)


def _type_beta(row: Any, layer_type: str) -> float:
    """β of a layer type in a regime row: its own β_attn/β_mlp when set (0 included), else the row's β."""
    own = row.beta_attn if layer_type == "attn" else row.beta_mlp if layer_type == "mlp" else None
    return float(own) if own is not None else float(row.beta)


def seb_layer_weights(
    signals: Sequence[float], layer_types: Sequence[str], sparsity: float, config: SEBConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SEB layer weights w_ℓ and z-scores for one sparsity.

    Args:
        signals: per-layer σ₊ (or Hill α); NaN entries get z = 0 (neutral).
        layer_types: per-layer ``"attn"``/``"mlp"``/``"other"``.
        sparsity: global target s in [0, 1).
        config: :class:`SEBConfig`.

    Returns:
        (w, z): two float64 arrays of length L.
    """
    cfg = config or SEBConfig()
    s = check_sparsity(sparsity)
    sig = np.asarray(signals, dtype=np.float64)
    finite = np.isfinite(sig)
    z = np.zeros_like(sig)
    if finite.sum() >= 2:
        peak = np.abs(sig[finite]).max()
        unit = sig[finite] / peak if peak > 0 else sig[finite]  # z is scale-free: no under/overflow for 1e-200 signals
        mu, sd = unit.mean(), unit.std()
        if sd > 0:
            z[finite] = (unit - mu) / sd
    row = cfg.regime(s)
    if row is None:
        return np.ones_like(sig), z
    decay = max(0.0, 1.0 - s / row.s_d) ** cfg.power
    betas = np.array(
        [_type_beta(row, t) for t in layer_types],
        dtype=np.float64,
    )
    w = np.maximum(cfg.min_weight, 1.0 + cfg.direction * betas * decay * z)
    return w, z


BudgetFn = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class BudgetContext:
    """Everything a counts-returning budget method may read (see :func:`register_budget_method`).

    Attributes:
        names: target layer names, in module order.
        weights: the target weights (parameters, read only; a sequence that brings an
            accelerate-offloaded weight in as it is read, so index it rather than keep it).
        numels: weights per layer.
        layer_types: ``"attn"``/``"mlp"``/``"other"`` per layer.
        fits: the MP fit per layer (None where undefined).
        sparsity: the global target s ∈ [0, 1).
        options: the plan's :class:`~mp_plugin.planning.build.PlanConfig` (``bounded``, ``seb``, …).
        model: the model (for methods that run calibration data through it).
        calibration: calibration batch(es), or None.
    """

    names: list[str]
    weights: Sequence[torch.Tensor]
    numels: list[int]
    layer_types: list[str]
    fits: list
    sparsity: float
    options: Any = None
    model: Any = None
    calibration: Any = None

    @property
    def target(self) -> int:
        """⌊s · Σ numel⌋ (``prune_target``): the exact number of weights every budget removes."""
        return prune_target(self.sparsity, sum(self.numels))


CountsFn = Callable[[BudgetContext], tuple[list[int], np.ndarray, np.ndarray]]


@dataclass
class _BudgetMethod:
    weights: BudgetFn | None
    uniform: bool = False
    doc: str = ""
    counts: CountsFn | None = None
    needs_calibration: bool = False


BUDGET_METHODS: dict[str, _BudgetMethod] = {}

DEFAULT_BUDGET = "mp-bulk"
"""The budget ``plan``, the CLI and the adapters use when none is given and no prune–restore follows.

It follows the measurement (``benchmarks/budgets.py``, benchmarks/README.md "Layer
budgets"): ``mp-bulk`` (:mod:`mp_plugin.budget.bulk_share`, global magnitude weighted by
the MP bulk energy share) was at least as good as one global |W| threshold on every
model and sparsity of the benchmark without restore and better on all three models.
The paper's rule stays available as ``budget="seb"``.
"""

DEFAULT_RESTORE_BUDGET = "magnitude"
"""The default budget when prune–restore follows (the CLI's ``--restore``, the adapters' ``restore=``).

After restore ``mp-bulk`` was worse than global magnitude on EfficientNet-Lite0 at
50/60/70 % (``benchmarks/budgets.py``), so that route keeps global magnitude.
"""


def default_budget(restore: Any = False) -> str:
    """The default budget of a route: :data:`DEFAULT_RESTORE_BUDGET` when ``restore`` is set
    (True, a :class:`~mp_plugin.restore.RestoreConfig` or its dict), else :data:`DEFAULT_BUDGET`."""
    return DEFAULT_RESTORE_BUDGET if restore is not None and restore is not False else DEFAULT_BUDGET


def register_budget_method(
    name: str,
    fn: BudgetFn | None,
    uniform: bool = False,
    doc: str = "",
    counts: CountsFn | None = None,
    needs_calibration: bool = False,
) -> None:
    """Register a budget method.

    Either ``fn(fits, layer_types, sparsity, seb_config) -> (w, z)`` (layer weights for the
    global |W|/w_ℓ threshold), or ``counts(ctx: BudgetContext) -> (counts, w, z)``: exact
    per-layer prune counts summing to ``ctx.target``, plus per-layer values recorded in
    the plan as ``w`` (the layer's sparsity relative to s) and ``z`` (its signal).
    ``needs_calibration``: ``plan`` refuses the method without ``calibration``.
    """
    BUDGET_METHODS[name] = _BudgetMethod(fn, uniform, doc, counts, needs_calibration)


def _seb(signal: str | None) -> BudgetFn:
    def fn(fits, layer_types, sparsity, config):
        cfg = config or SEBConfig()
        attr = signal or cfg.signal  # None: the config's signal
        # a degenerate fit (all-zero or very low-rank layer) has no edge: neutral, as in every other budget
        vals = [float("nan") if f is None or f.degenerate else getattr(f, attr, float("nan")) for f in fits]
        return seb_layer_weights(vals, layer_types, sparsity, cfg)

    return fn


def _ones(fits, layer_types, sparsity, config):
    n = len(layer_types)
    return np.ones(n), np.zeros(n)


register_budget_method("seb", _seb(None), doc="Spectral Edge Budgeting on the fitted edge σ₊ (SEBConfig.signal)")
register_budget_method("seb-hill", _seb("hill_alpha"), doc="Spectral Edge Budgeting on the Hill α")
register_budget_method("magnitude", _ones, doc="global magnitude (all w_ℓ = 1)")
register_budget_method("uniform", _ones, uniform=True, doc="the same fraction in every layer")
