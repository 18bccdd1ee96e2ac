"""Validation of a prune plan's structure: a JSON file or an in-memory :class:`~mp_plugin.plan.PrunePlan`.

A plan is plain, editable data, so a hand-edited or truncated file must fail
with a message that names the file, the layer and the field, never with a
``KeyError`` or ``TypeError`` deep inside :func:`mp_plugin.apply`.
:func:`check_plan_dict` checks the JSON form before any object is built; :func:`check_layer_values` checks the numbers ``apply``
relies on (``n_prune``, ``numel``, ``pattern``, shapes) on live objects too, so
a plan tampered with in Python is refused the same way.

Schema versions (:data:`SUPPORTED_SCHEMA_VERSIONS`; files of every one load):

* 1 — the layers, the config, ``skipped`` and ``applied`` (per-layer methods, restore).
* 2 — adds ``applied["permutation"]``: the channel permutation ``apply(..., permute=...)``
  folded into the weights, as ``{"permutations": {consumer: [int, ...]}, "folds": [...],
  "report": {...} | null}`` (:mod:`mp_plugin.permute.record`), or null. A plan loaded
  from a version-1 file is upgraded in memory and saved as version 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mp_plugin.errors import MPPluginError, PatternError, PlanFormatError
from mp_plugin.layers.patterns import Pattern

__all__ = ["SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS", "check_plan_dict", "check_layer_values", "check_permutation"]

SCHEMA_VERSION = 2  # written by PrunePlan.save
SUPPORTED_SCHEMA_VERSIONS = (1, 2)  # read by PrunePlan.load

_TOP_REQUIRED = ("schema_version", "sparsity", "pattern", "method", "layers")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shape(value: Any, where: str, min_dims: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) < min_dims or not all(_is_int(s) and s > 0 for s in value):
        raise PlanFormatError(f"{where} must be a list of ≥{min_dims} positive integers, got {value!r}")
    return tuple(value)


def check_layer_values(
    name: Any,
    weight_shape: Any,
    numel: Any,
    n_prune: Any,
    pattern: Any,
    where: str,
    shape: Any = None,
) -> None:
    """Raise :class:`PlanFormatError` unless one layer's counts, shapes and pattern are consistent.

    Args:
        name: module name (non-empty str).
        weight_shape: the weight's own shape (≥2 positive ints).
        numel: number of weights = prod(weight_shape).
        n_prune: weights the unstructured budget removes, an int in [0, numel].
        pattern: ``"dense"``, ``"unstructured"`` or ``"k:n"``.
        where: prefix of the message (file and layer).
        shape: the 2-D view (C_out, C_in·kh·kw), checked against ``weight_shape`` when given.
    """
    if not isinstance(name, str) or not name:
        raise PlanFormatError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    ws = _shape(weight_shape, f"{where}: 'weight_shape'", 2)
    total = math.prod(ws)
    if not _is_int(numel) or numel != total:
        raise PlanFormatError(
            f"{where}: 'numel' must be the integer {total} (the product of weight_shape), got {numel!r}"
        )
    if shape is not None:
        two_d = _shape(shape, f"{where}: 'shape'", 2)
        if len(two_d) != 2 or two_d[0] != ws[0] or two_d[1] != total // ws[0]:
            raise PlanFormatError(f"{where}: 'shape' {list(two_d)} does not match weight_shape {list(ws)}")
    if not _is_int(n_prune) or not 0 <= n_prune <= total:
        raise PlanFormatError(
            f"{where}: 'n_prune' must be an integer in [0, {total}] (weights to remove), got {n_prune!r}"
        )
    if not isinstance(pattern, str):
        raise PlanFormatError(f"{where}: 'pattern' must be a string such as 'unstructured' or '2:4', got {pattern!r}")
    try:
        pat = Pattern.parse(pattern)
    except MPPluginError as exc:
        raise PatternError(f"{where}: {exc}") from exc
    if not pat.eligible(ws):
        raise PatternError(
            f"{where}: pattern {pattern} needs input channels divisible by {pat.n}; "
            f"{ws[1]} (weight {list(ws)}) is not divisible"
        )


def _number(
    d: Mapping, key: str, where: str, lo: float | None = None, hi: float | None = None, none_ok: bool = False
) -> None:
    v = d.get(key)
    if v is None and none_ok:
        return
    if not _is_real(v) or not math.isfinite(v):
        raise PlanFormatError(f"{where}: '{key}' must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise PlanFormatError(f"{where}: '{key}' must lie in [{lo}, {hi}], got {v!r}")


def _check_keys(d: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise PlanFormatError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = sorted(required - set(d))
    if missing:
        raise PlanFormatError(f"{where} lacks the field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise PlanFormatError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; known: {sorted(allowed)}")


def check_permutation(record: Any, where: str) -> None:
    """Raise :class:`PlanFormatError` unless ``record`` is null or a permutation record's JSON form.

    The form is ``{"permutations": {name: [int, ...]}, "folds": [{"kind", "site", "perm"}, ...],
    "report": object | null}``; each permutation must hold every index 0..C−1 once.
    """
    if record is None:
        return
    if not isinstance(record, Mapping):
        raise PlanFormatError(f"{where} must be an object or null, got {type(record).__name__}")
    _check_keys(record, {"permutations", "folds", "report"}, {"permutations", "folds"}, where)
    perms, folds = record["permutations"], record["folds"]
    if not isinstance(perms, Mapping):
        raise PlanFormatError(f"{where}: 'permutations' must map layer names to index lists")

    def check_perm(value: Any, at: str) -> None:
        if (
            not isinstance(value, list)
            or not all(_is_int(i) for i in value)
            or sorted(value) != list(range(len(value)))
        ):
            raise PlanFormatError(f"{at} must be a permutation of 0..C−1 (a list of distinct integers)")

    for name, value in perms.items():
        check_perm(value, f"{where}: permutation of {name!r}")
    if not isinstance(folds, list):
        raise PlanFormatError(f"{where}: 'folds' must be a list, got {type(folds).__name__}")
    for i, fold in enumerate(folds):
        at = f"{where}: folds[{i}]"
        _check_keys(fold, {"kind", "site", "perm"}, {"kind", "site", "perm"}, at)
        if fold["kind"] not in ("coupling", "attention") or not isinstance(fold["site"], Mapping):
            raise PlanFormatError(f"{at} must have kind 'coupling' or 'attention' and a 'site' object")
        check_perm(fold["perm"], f"{at}: 'perm'")
    if record.get("report") is not None and not isinstance(record["report"], Mapping):
        raise PlanFormatError(f"{where}: 'report' must be an object or null")


def check_plan_dict(
    d: Any,
    source: str,
    version: int | tuple[int, ...],
    top_fields: set[str],
    layer_fields: dict[str, bool],
) -> None:
    """Raise :class:`PlanFormatError` unless ``d`` is a well-formed plan of a supported schema version.

    Args:
        d: the decoded JSON.
        source: names the plan in messages (a file path or ``"plan"``).
        version: the supported schema version(s).
        top_fields: allowed top-level keys.
        layer_fields: allowed layer keys → whether the key is required.
    """
    if not isinstance(d, Mapping):
        raise PlanFormatError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
    versions = (version,) if isinstance(version, int) else tuple(version)
    got = d.get("schema_version")
    if not _is_int(got) or got not in versions:
        expected = " or ".join(map(str, versions))
        raise PlanFormatError(f"{source}: plan schema version {got!r} is not supported (expected {expected})")
    _check_keys(d, top_fields, set(_TOP_REQUIRED), source)
    _number(d, "sparsity", source, 0.0, 1.0)
    for key in ("pattern", "method"):
        if not isinstance(d[key], str):
            raise PlanFormatError(f"{source}: '{key}' must be a string, got {d[key]!r}")
    for key, kind in (
        ("model_name", str),
        ("created", str),
        ("applied", Mapping),
        ("skipped", list),
        ("config", Mapping),
    ):
        if key in d and not isinstance(d[key], kind):
            raise PlanFormatError(
                f"{source}: '{key}' must be a {getattr(kind, '__name__', kind)}, got {type(d[key]).__name__}"
            )
    log = d.get("applied", {}).get("layers", {})
    if not isinstance(log, Mapping) or not all(isinstance(v, Mapping) for v in log.values()):
        raise PlanFormatError(f"{source}: 'applied.layers' must map layer names to objects")
    if not isinstance(d.get("applied", {}).get("restore") or {}, Mapping):
        raise PlanFormatError(f"{source}: 'applied.restore' must be an object or null")
    if "permutation" in d.get("applied", {}):
        if got < 2:
            raise PlanFormatError(f"{source}: 'applied.permutation' needs plan schema version 2, the file says {got}")
        check_permutation(d["applied"]["permutation"], f"{source}: 'applied.permutation'")
    layers = d["layers"]
    if not isinstance(layers, list) or not layers:
        got = type(layers).__name__ if not isinstance(layers, list) else "an empty list"
        raise PlanFormatError(f"{source}: 'layers' must be a non-empty list, got {got}")
    seen: set[str] = set()
    required = {k for k, req in layer_fields.items() if req}
    for i, lp in enumerate(layers):
        where = f"{source}: layers[{i}]"
        _check_keys(lp, set(layer_fields), required, where)
        where = f"{source}: layer {lp['name']!r}" if isinstance(lp["name"], str) else where
        check_layer_values(
            lp["name"], lp["weight_shape"], lp["numel"], lp["n_prune"], lp["pattern"], where, lp["shape"]
        )
        if lp["name"] in seen:
            raise PlanFormatError(f"{where} appears twice")
        seen.add(lp["name"])
        for key in ("kind", "layer_type", "note"):
            if key in lp and not isinstance(lp[key], str):
                raise PlanFormatError(f"{where}: '{key}' must be a string, got {lp[key]!r}")
        _number(lp, "w", where)
        _number(lp, "z", where, none_ok=True)
        _number(lp, "unstructured_budget", where, 0.0, 1.0)
        _number(lp, "sparsity", where, 0.0, 1.0)
        if lp["fit"] is not None and not isinstance(lp["fit"], Mapping):
            raise PlanFormatError(f"{where}: 'fit' must be an object or null, got {type(lp['fit']).__name__}")
        if lp["fit"] is not None:
            _check_fit(lp["fit"], f"{where}: 'fit'")


_FIT_NUMBERS = (
    "sigma", "sigma_plus", "lambda_plus", "threshold", "bulk_fraction", "fit_error", "stable_rank", "hill_alpha",
    "spike_energy_fraction", "gamma", "alpha", "beta",
)  # fmt: skip


def _check_fit(fit: Mapping, where: str) -> None:
    """The fit's numbers are numbers (NaN allowed; null for the two that may be undefined), its shape two ints."""
    for key in _FIT_NUMBERS:
        if key not in fit:
            continue
        v = fit[key]
        if v is None and key in ("hill_alpha", "fit_error"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PlanFormatError(f"{where}: '{key}' must be a number, got {v!r}")
    if "n_spikes" in fit and not _is_int(fit["n_spikes"]):
        raise PlanFormatError(f"{where}: 'n_spikes' must be an integer, got {fit['n_spikes']!r}")
    shape = fit.get("shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(i) for i in shape)):
        raise PlanFormatError(f"{where}: 'shape' must be two integers, got {shape!r}")
    sv = fit.get("singular_values", [])
    if not isinstance(sv, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sv):
        raise PlanFormatError(f"{where}: 'singular_values' must be a list of numbers")


def check_plan_object(plan: Any) -> None:
    """Raise :class:`PlanFormatError` unless an in-memory plan's layers are consistent.

    ``apply`` calls it, so a plan edited in Python (a string, float or negative
    ``n_prune``, a pattern typo, a duplicated layer) is refused before the model is touched.
    """
    layers = getattr(plan, "layers", None)
    if not isinstance(layers, list):
        raise PlanFormatError(f"expected a PrunePlan with a list of layers, got {type(plan).__name__}")
    seen: set[str] = set()
    for i, lp in enumerate(layers):
        name = getattr(lp, "name", None)
        where = f"plan layer {name!r}" if isinstance(name, str) else f"plan.layers[{i}]"
        try:
            values = (lp.name, lp.weight_shape, lp.numel, lp.n_prune, lp.pattern)
        except AttributeError as exc:
            raise PlanFormatError(f"{where} is not a LayerPlan ({type(lp).__name__})") from exc
        check_layer_values(*values, where, getattr(lp, "shape", None))
        if lp.name in seen:
            raise PlanFormatError(f"{where} appears twice")
        seen.add(lp.name)
