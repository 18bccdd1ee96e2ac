"""``measured`` / ``measured-restore``: the dense/2:4 mix chosen by each layer's 2:4 damage measured on calibration data.

For every eligible target layer alone, magnitude 2:4 is put on its weight, the
calibration batches run through the model, and the damage is the relative output
error of the whole model,

    d_ℓ = Σ_batches ‖y_ℓ − y‖²_F / Σ_batches ‖y‖²_F   (dimensionless),

with y the dense model's output and y_ℓ the output with only layer ℓ 2:4. A layer in
memory gets its 2:4 weight for the passes and its exact original back afterwards, so the
model leaves unchanged. An accelerate-offloaded layer (weight on meta) is read once
(:func:`mp_plugin.layers.offload.onloaded`) and never written: a forward hook subtracts
the part of its output that 2:4 removes, f(x; W − P₂:₄(W)) (a Linear or convolution is
linear in its weight, so y − f(x; ΔW) = f(x; P₂:₄(W)) + b up to float rounding); such a
layer must run as a module to be measured. A layer that never runs on the calibration data
(and whose swap leaves the output unchanged) gets NaN, an unknown damage that the knapsack
takes only when the target needs it; a layer whose weight is computed on access
(a parametrization, weight_norm) is refused. The
output is the model's tensor, or its ``logits``, ``last_hidden_state``, or the first
tensor of a tuple or dict; of a per-token output of a token batch (a dict with an
``attention_mask``) only the real tokens count. The model runs in eval mode (no dropout noise) and the
training flag is restored. Cost: one forward pass over the calibration data per
eligible layer, plus one dense pass.

``measured-restore`` measures the same after prune–restore of that layer: its kept
weights re-solved on the layer's calibration input Gram (:func:`mp_plugin.restore.restore_layer`,
``RestoreConfig()``), the damage the layer does when ``apply(..., restore=...)`` follows.
The Gram is captured one layer at a time (the forward stops after the layer), so the
memory is one layer's Gram; the cost is one partial and one full pass per layer.

This is the calibrated counterpart of the benchmark's in-sample "measured 2:4
sensitivity" row: a measurement, not an MP estimate. Registered as the mix rules
``measured`` and ``measured-restore`` (``plan(..., "auto", config=PlanConfig(auto_patterns=("dense", "2:4"),
mix_rule="measured"), calibration=batches)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import CalibrationError, ConfigError
from mp_plugin.layers.calibration import call_model, eval_mode, real_tokens, token_mask
from mp_plugin.layers.offload import is_offloaded, onloaded, weight_identity
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import derived_weight_reason
from mp_plugin.masks.select import nm_mask
from mp_plugin.progress import progress
from mp_plugin.restore import RestoreConfig, capture_grams, restore_layer

__all__ = ["DENSE_CACHE_BYTES", "model_output", "measured_kn_damage"]

DENSE_CACHE_BYTES = 1 << 30  # dense outputs kept up to 1 GiB; beyond, recomputed batch by batch


def model_output(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``.logits``, ``.last_hidden_state``, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in items:
        if isinstance(value, torch.Tensor):
            return value
    raise CalibrationError(f"the model's output ({type(out).__name__}) holds no tensor to measure the 2:4 damage on")


def _output(model: nn.Module, batch: Any, i: int) -> torch.Tensor:
    """One batch's output as float32 on the CPU; a per-token output (B, T, …) keeps only the real tokens."""
    mask = token_mask(batch)
    with real_tokens(mask):
        y = model_output(call_model(model, batch, f"calibration batch {i}"))
    if mask is not None and y.ndim >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        y = y[mask.to(y.device).bool()]
    return y.detach().to("cpu", torch.float32)


def _weight_term(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(x; w): the part of the layer's output that is linear in its weight (no bias)."""
    if isinstance(module, nn.Linear):
        return lambda x, w: F.linear(x, w)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return lambda x, w: module._conv_forward(x, w, None)
    raise ConfigError(
        f"mix rules 'measured'/'measured-restore' measure Linear and Conv1d/2d layers, not {type(module).__name__}"
    )


def _kn_change(
    module: nn.Module, name: str, offloaded: bool, k: int, n: int, restore: RestoreConfig | None, gram: Any
) -> torch.Tensor:
    """What makes one layer k:n: W̃ (its magnitude k:n weight, re-solved on ``gram`` when ``restore``
    is given) for a layer in memory, ΔW = W − W̃ for an accelerate-offloaded one (read, not written)."""
    why = derived_weight_reason(module)
    if why is not None:
        raise ConfigError(f"layer {name!r}: the measured mix rules cannot put 2:4 on it: {why}")
    with onloaded([module]):
        dense = module.weight.detach()
        pruned = dense * nm_mask(dense, k, n).to(dense.dtype)
        if restore is not None and gram is not None:
            restore_layer(pruned, dense, gram, restore, groups=int(getattr(module, "groups", 1)))
        return dense - pruned if offloaded else pruned


def _tied_to(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The other Linear/Conv modules of ``model`` whose offloaded weight is ``module``'s stored weight."""
    key = weight_identity(module)
    return [
        m
        for m in model.modules()
        if m is not module and isinstance(m, _TIEABLE) and is_offloaded(m) and weight_identity(m) == key
    ]


_TIEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _KnSwitch:
    """Turns one layer's k:n version on and off, and counts the layer's calls while it is on.

    In memory, W̃ is copied into the weight while on and the original copied back when off
    (this also reaches a weight used outside the module's own forward). Offloaded, the weight
    is never touched: while on, a forward hook subtracts f(x; ΔW) from the layer's output (on
    the output's device and in its dtype), and from the output of every module ``tied`` to the
    same stored weight. :meth:`close` puts everything back.
    """

    def __init__(
        self, module: nn.Module, change: torch.Tensor, offloaded: bool, tied: Sequence[nn.Module] = ()
    ) -> None:
        self.module, self.change = module, change
        self.original = None if offloaded else module.weight.detach().clone()
        self.active, self.calls = False, 0
        self.moved: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        hooked = [module, *(m for m in tied if m is not module)] if offloaded else [module]
        self.terms = {id(m): _weight_term(m) for m in hooked} if offloaded else {}
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in hooked]

    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not self.active:
            return None
        self.calls += 1
        term = self.terms.get(id(mod))
        if term is None:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        x = x.to(out.device)  # accelerate moves the input to the layer's device after this hook's view of it
        key = (x.device, x.dtype)
        if key not in self.moved:
            self.moved[key] = self.change.to(x.device, x.dtype)
        return out - term(x, self.moved[key]).to(out.dtype)

    def on(self) -> None:
        self.active = True
        if self.original is not None:
            self.module.weight.detach().copy_(self.change)

    def off(self) -> None:
        self.active = False
        if self.original is not None:
            self.module.weight.detach().copy_(self.original)

    def close(self) -> None:
        self.off()
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def measured_kn_damage(
    model: nn.Module,
    names: Sequence[str],
    calibration: Any,
    k: int = 2,
    n: int = 4,
    show_progress: bool = False,
    restore: RestoreConfig | None = None,
    max_cache_bytes: int = DENSE_CACHE_BYTES,
) -> dict[str, float]:
    """{layer name: d_ℓ}: the model's relative output error on ``calibration`` with only that layer k:n.

    Args:
        model: the dense model (left unchanged; a layer offloaded by accelerate is read
            one at a time and its store is not written).
        names: target layer names (Linear or Conv1d/2d modules); layers whose input
            width the pattern does not divide are skipped (absent from the result).
        calibration: one batch or a list of batches (tensor, tuple or dict, as
            :func:`mp_plugin.layers.calibration.run_batches` takes).
        k, n: the pattern (magnitude k:n: the k largest |W| of each n along the input).
        show_progress: a progress bar over the layers.
        restore: when given, the layer's kept weights are re-solved with this config
            (prune–restore of that layer alone) before the output is measured.
        max_cache_bytes: the dense outputs (float32, CPU) are kept when they fit in this
            many bytes; otherwise each batch's dense output is recomputed next to its pruned
            one (twice the passes; e.g. a language model's logits over many tokens).

    Returns:
        d_ℓ ≥ 0, dimensionless (0 when the dense output is all zero); NaN for a layer that
        never ran as a module on the calibration data and left its output unchanged (unknown).

    Raises:
        ConfigError: a layer's weight is computed on access (parametrization, weight_norm), or
            an offloaded layer is not a Linear/Conv1d/Conv2d.
    """
    batches = calibration if isinstance(calibration, list) else [calibration]
    if not batches:
        raise CalibrationError("calibration data is an empty list: give at least one batch")
    modules = dict(model.named_modules())
    pattern = Pattern.parse(f"{k}:{n}")
    with eval_mode(model):
        cache: list[torch.Tensor] | None = []
        energy, size = 0.0, 0
        for i, batch in enumerate(batches):
            y = _output(model, batch, i)
            energy += float(y.double().square().sum())
            size += y.numel() * y.element_size()
            if cache is not None:
                cache = cache + [y] if size <= max_cache_bytes else None
        out: dict[str, float] = {}
        for name in progress(list(names), desc="2:4 damage per layer", unit="layer", disable=not show_progress):
            module = modules[name]
            offloaded = is_offloaded(module)
            if not pattern.eligible(tuple(module.weight.shape)):
                continue
            gram = None
            if restore is not None:  # a layer the calibration never reaches keeps its plain k:n
                gram = capture_grams(model, [name], batches, stop_after=name).get(name)
            tied = _tied_to(model, module) if offloaded else []
            switch = _KnSwitch(module, _kn_change(module, name, offloaded, k, n, restore, gram), offloaded, tied)
            err = 0.0
            try:
                for i, batch in enumerate(batches):
                    dense = _output(model, batch, i) if cache is None else cache[i]
                    switch.on()
                    err += float((_output(model, batch, i) - dense).double().square().sum())
                    switch.off()
            finally:
                switch.close()
            if switch.calls == 0 and err == 0:  # never ran on this data: its damage is unknown, not zero
                out[name] = float("nan")
            else:
                out[name] = err / energy if energy > 0 else 0.0
        return out


def _damage_array(layers: Any, rule: str, restore: RestoreConfig | None) -> np.ndarray:
    """(L,) measured d_ℓ of the layers in ``layers`` (a ``MixLayers``), NaN where a layer was not measured."""
    if layers.model is None or layers.calibration is None:
        raise ConfigError(f"mix rule {rule!r} needs calibration data: plan(..., calibration=batches)")
    d = measured_kn_damage(
        layers.model, layers.names, layers.calibration, show_progress=layers.show_progress, restore=restore
    )
    return np.asarray([d.get(name, np.nan) for name in layers.names], dtype=np.float64)


def measured_damage_array(layers: Any) -> np.ndarray:
    """The ``measured`` damage rule of :mod:`mp_plugin.budget.mix` (NaN: layer not measured)."""
    return _damage_array(layers, "measured", None)


def measured_restore_damage_array(layers: Any) -> np.ndarray:
    """The ``measured-restore`` damage rule of :mod:`mp_plugin.budget.mix` (NaN: layer not measured)."""
    return _damage_array(layers, "measured-restore", RestoreConfig())
