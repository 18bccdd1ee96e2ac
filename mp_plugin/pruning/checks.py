"""Checks ``mp_plugin.apply`` runs before it touches the model.

Every argument that ``apply`` would otherwise silently ignore or misread (a
negative ``prior_alpha``, an unknown ``permute`` value, ``calibration=[]``), a
plan that was tampered with, and weights that cannot be pruned in place (meta
device, NaN/Inf, complex, a parametrization such as ``weight_norm`` that
recomputes the weight on every access) are refused here with a named
:class:`~mp_plugin.errors.MPPluginError`, so the model is untouched when
``apply`` fails. A weight that Hugging Face ``accelerate`` offloaded (meta tensor
behind its hook) is brought in one layer at a time for the NaN/Inf check; a
channel permutation of an offloaded model is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import CalibrationError, ConfigError, InvalidWeightError, MPPluginError, PlanFormatError
from mp_plugin.layers.offload import first_offloaded, is_offloaded, onloaded, preload_reason, write_back_problem
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import derived_weight_reason
from mp_plugin.planning.schema import check_plan_object

__all__ = [
    "PERMUTE_VALUES",
    "check_apply_inputs",
    "derived_weight_reason",
    "undo_permutations_on_error",
]

PERMUTE_VALUES = (False, None, True, "none", "swap", "interleave")


def _real_number(value: Any, name: str, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a real number ≥ {lo}, got {value!r}") from None
    if not math.isfinite(value) or value < lo:
        raise ConfigError(f"{name} must be a finite number ≥ {lo}, got {value!r}")
    return float(value)


def _check_cast_config(cfg: Any) -> None:
    from mp_plugin.masks.cast import CastConfig

    if cfg is None:
        return
    if not isinstance(cfg, CastConfig):
        raise ConfigError(f"cast_config must be a CastConfig, got {type(cfg).__name__}")
    _real_number(cfg.prior_alpha, "cast_config.prior_alpha")
    choices = {"prior_scale": ("code", "esm"), "source": ("dense", "ser"), "dtype": ("float64", "float32")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"cast_config.{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    for key in ("max_enumerate", "n_samples", "chunk_elements"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"cast_config.{key} must be a positive integer, got {v!r}")


def check_apply_inputs(
    model: Any,
    plan: Any,
    calibration: Any = None,
    prior_alpha: Any = 0.0,
    permute: Any = False,
    cast_config: Any = None,
    max_calibration_rows: Any = 4096,
) -> None:
    """Refuse, before anything is modified, every input ``apply`` cannot honour exactly.

    Raises:
        PlanFormatError: ``plan`` is not a PrunePlan or its layers are inconsistent
            (e.g. a string, float or negative ``n_prune``).
        PlanMismatchError: the model lacks a plan layer or a shape differs.
        InvalidWeightError: a plan layer's weight is on the meta device (and not
            offloaded by accelerate), not real floating point, parametrized/recomputed, or (for layers to prune) NaN/Inf.
        ConfigError: ``prior_alpha``, ``permute``, ``cast_config`` or ``max_calibration_rows`` invalid,
            or a permutation asked of an accelerate-offloaded model.
        CalibrationError: ``calibration`` is an empty list.
    """
    from mp_plugin.planning.plan import PrunePlan

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, PrunePlan):
        raise PlanFormatError(
            f"plan must be a PrunePlan (mp_plugin.plan(...) or PrunePlan.load), got {type(plan).__name__}"
        )
    check_plan_object(plan)
    _real_number(prior_alpha, "prior_alpha")
    if not any(permute is v or (isinstance(v, str) and permute == v) for v in PERMUTE_VALUES):
        raise ConfigError(f"permute must be False, True, 'none', 'swap' or 'interleave', got {permute!r}")
    _check_cast_config(cast_config)
    if isinstance(max_calibration_rows, bool) or not isinstance(max_calibration_rows, int) or max_calibration_rows < 1:
        raise ConfigError(f"max_calibration_rows must be a positive integer, got {max_calibration_rows!r}")
    if isinstance(calibration, list) and not calibration:
        raise CalibrationError("calibration is an empty list: give at least one batch, or None")
    modules = plan.check_model(model)
    if permute not in (False, None, "none"):  # validated above: one of PERMUTE_VALUES
        offloaded = first_offloaded(model)
        if offloaded is not None:
            raise ConfigError(
                f"permute={permute!r} is not supported on an accelerate-offloaded model ({offloaded!r} is "
                "offloaded): the permutation is folded into many modules' weights; permute the model in memory"
            )
    for lp in plan.layers:
        mod = modules[lp.name]
        why = derived_weight_reason(mod)
        if why is not None:
            raise InvalidWeightError(f"layer {lp.name!r}: {why}")
        w = mod.weight
        if w.is_meta and not is_offloaded(mod):
            why = preload_reason(model, lp.name)
            if why is not None:
                raise InvalidWeightError(why)
            raise InvalidWeightError(
                f"layer {lp.name!r}: weight is on the meta device (no data); materialise the model "
                "(e.g. model.to_empty(device='cpu') and load its weights) before apply"
            )
        if w.is_complex() or not w.is_floating_point():
            raise InvalidWeightError(f"layer {lp.name!r}: weight dtype {w.dtype} is not real floating point")
        if Pattern.parse(lp.pattern).kind != "dense":
            problem = write_back_problem(mod) if is_offloaded(mod) else None
            if problem is not None:  # found before any layer is pruned
                raise MPPluginError(f"layer {lp.name!r} cannot be pruned in accelerate's offload store: {problem}")
            with onloaded([mod]):  # an accelerate-offloaded weight is brought in, one layer at a time
                finite = bool(torch.isfinite(mod.weight.detach()).all())
            if not finite:
                raise InvalidWeightError(
                    f"layer {lp.name!r}: weight contains NaN or Inf; a mask cannot be chosen (and NaN·0 stays NaN)"
                )


@contextmanager
def undo_permutations_on_error(model: nn.Module, folds: list, keep: Callable[[], bool] | None = None) -> Iterator[None]:
    """Undo ``folds`` (the channel permutations just folded into ``model``) if the block raises.

    ``apply(..., permute=...)`` folds permutations before it reads calibration data;
    when that data then fails before any layer is pruned (e.g. a later batch of the
    wrong shape), the folds are replayed backwards, so the model is left exactly as it
    was (and the plan records no permutation). When ``keep()`` is true at that point
    (layers were already pruned in the permuted basis: a sequential restore that failed
    part-way), the folds stay, since undoing them would break those layers' k:n groups;
    the caller records them.
    """
    try:
        yield
    except BaseException:
        if folds and not (keep is not None and keep()):
            from mp_plugin.permute import undo_folds

            undo_folds(model, folds)
        raise
