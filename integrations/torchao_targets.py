"""Which modules torchao hands to a config's handler, computed the way torchao 0.18 does it.

torchao never tells a handler the module's name or the model, so a whole-model plan
must know beforehand which modules the call will reach. Two rules exist:

* ``sparsify_`` / ``quantize_`` with a ``filter_fn``: the filter is evaluated top-down,
  starting at the model itself (name ``""``); a module it accepts is handed to the
  handler whole and its children are not visited. Without ``filter_fn`` the filter is
  "a Linear layer" (``nn.Linear``, but not the ``NonDynamicallyQuantizableLinear`` that
  ``nn.MultiheadAttention`` keeps as ``out_proj``).
* ``quantize_`` with ``FqnToConfig``: every module is looked at; its weight gets the config
  of the exact parameter name, else the module gets the config of the exact module name,
  else the weight gets the config of a ``"re:"`` pattern fully matching the parameter name,
  else the module gets the first ``"re:"`` pattern fully matching the module name, else
  ``"_default"`` (Linear layers only).

:func:`reached_layers` returns, for either rule, the names of the modules whose weights
the handler will see (a module handed over whole contributes its whole subtree).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from mp_plugin.errors import ConfigError

__all__ = ["is_linear_target", "filter_matches", "fqn_matches", "reached_layers"]

FilterFn = Callable[[nn.Module, str], bool]
_SELECTED = object()  # the value of a key given without a config: "this key selects the module"


def is_linear_target(module: nn.Module, fqn: str = "") -> bool:
    """torchao's default filter: a plain ``nn.Linear`` with a weight (not an attention ``out_proj``)."""
    return (
        isinstance(module, nn.Linear)
        and getattr(module, "weight", None) is not None
        and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)
    )


def filter_matches(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` pairs that ``sparsify_(model, config, filter_fn)`` hands to the handler, in call order."""
    accept = filter_fn or is_linear_target
    found: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, fqn: str) -> None:
        if accept(module, fqn):
            found.append((fqn, module))
            return
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    return found


def _as_mapping(fqn_to_config: Any) -> Mapping[str, Any]:
    mapping = getattr(fqn_to_config, "fqn_to_config", fqn_to_config)  # a torchao FqnToConfig or its dict
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(fqn_to_config, Iterable) and not isinstance(fqn_to_config, str):
        return dict.fromkeys(fqn_to_config, _SELECTED)
    raise ConfigError(f"fqn_to_config must be an FqnToConfig, a mapping or a list of keys, got {fqn_to_config!r}")


def _resolve(module: nn.Module, fqn: str, mapping: Mapping[str, Any]) -> tuple[str, list[Any]] | None:
    """What ``FqnToConfig`` gives ``module``: ``("weight", configs)``, ``("module", [config])`` or None.

    As torchao 0.18's ``quantize_`` does: an exact parameter key and then *every* regex matching the
    parameter's name each call the handler for the weight, so a weight can receive several configs.
    """
    attributes = dir(module)
    params = [n for n, _ in module.named_parameters() if n in attributes]  # torchao's "top-level" parameters
    full = {n: f"{fqn}.{n}" if fqn else n for n in params}
    found, weight, skip = False, [], set()
    for n in params:
        if full[n] in mapping:
            found = True
            if mapping[full[n]] is None:
                skip.add(n)
            elif n == "weight":
                weight.append(mapping[full[n]])
    if not found and fqn in mapping:
        return None if mapping[fqn] is None else ("module", [mapping[fqn]])
    for n in params:
        for key, value in mapping.items():
            if n not in skip and key.startswith("re:") and re.fullmatch(key[3:], full[n]):
                found = True
                if n == "weight" and value is not None:
                    weight.append(value)
    if found:
        return ("weight", weight) if weight else None
    for key, value in mapping.items():
        if key.startswith("re:") and re.fullmatch(key[3:], fqn):
            return None if value is None else ("module", [value])
    default = mapping.get("_default")
    return None if default is None else ("module", [default])


def fqn_matches(
    model: nn.Module, fqn_to_config: Any, wanted: Callable[[Any], bool]
) -> list[tuple[str, nn.Module, str]]:
    """``(fqn, module, what)`` for each module ``quantize_(model, FqnToConfig(...))`` hands a wanted config to.

    Args:
        model: the model.
        fqn_to_config: a torchao ``FqnToConfig``, its ``{key: config}`` dict, or a list of keys
            (every key then selects).
        wanted: true for the configs that count (e.g. ``isinstance(c, MPSparsifier)``).

    Returns:
        ``what`` is ``"weight"`` (the handler is called for the module's weight) or
        ``"module"`` (the handler gets the whole module).
    """
    mapping = _as_mapping(fqn_to_config)
    out = []
    for fqn, module in model.named_modules():
        own = fqn in mapping or any(k.startswith("re:") and re.fullmatch(k[3:], fqn) for k in mapping)
        attributes = dir(module)
        param = any(
            (p := f"{fqn}.{n}" if fqn else n) in mapping
            or any(k.startswith("re:") and re.fullmatch(k[3:], p) for k in mapping)
            for n, _ in module.named_parameters()
            if n in attributes
        )
        if not (own or param or ("_default" in mapping and is_linear_target(module))):
            continue
        hit = _resolve(module, fqn, mapping)
        if hit is not None and any(c is _SELECTED or wanted(c) for c in hit[1]):
            out.append((fqn, module, hit[0]))
    return out


def reached_layers(
    model: nn.Module,
    filter_fn: FilterFn | None = None,
    fqn_to_config: Any = None,
    wanted: Callable[[Any], bool] = lambda c: True,
) -> list[str]:
    """Names of the modules whose weights the handler will see (a whole-module call: the subtree)."""
    if filter_fn is not None and fqn_to_config is not None:
        raise ConfigError("give filter_fn or fqn_to_config, not both (torchao refuses both as well)")
    if fqn_to_config is not None:
        hits = fqn_matches(model, fqn_to_config, wanted)
        pairs = [(fqn, module) for fqn, module, _ in hits]
        whole = {fqn for fqn, _, what in hits if what == "module"}
    else:
        pairs = filter_matches(model, filter_fn)
        whole = {fqn for fqn, _ in pairs}
    names: list[str] = []
    for fqn, module in pairs:
        names.append(fqn)
        if fqn in whole:
            names.extend(f"{fqn}.{sub}" if fqn else sub for sub, _ in module.named_modules() if sub)
    return list(dict.fromkeys(n for n in names if n))
