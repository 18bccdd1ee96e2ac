"""Calibration statistics: per-layer input covariances captured with forward hooks.

CAST (``mp_plugin.masks.cast``) needs, for every k:n group g of a layer (n
consecutive input channels at one kernel position, ``mp_plugin.layers.layout``), the
uncentred second moment C_g = E[h_g h_gᵀ] (n×n) of that
layer's input slice. This module runs a calibration batch through the model
with forward hooks and keeps only those (G, n, n) blocks, so memory stays at
C_in·kh·kw·n numbers per layer however large the batch is.

Input rows:

* Linear: every token is a row (B·T rows of ``in_features``). For token batches
  (a dict with ``input_ids`` and ``attention_mask``, as Hugging Face tokenizers
  return them) only the real tokens are rows: while :func:`run_batches` runs a
  batch, its ``attention_mask`` is the active token mask (:func:`active_token_mask`)
  and a Linear input whose leading dims are (B, T) keeps the rows where it is non-zero.
* Conv1d/Conv2d: every output position is a row of the unfolded input
  (``torch.nn.functional.unfold``). :func:`layer_input_rows` returns it
  channel-major (C_in·kh·kw, matching ``weight.reshape(C_out, -1)``); the
  covariances are kept in the k:n layout (:func:`mp_plugin.layers.layout.kn_input_columns`,
  matching :func:`mp_plugin.layers.layout.kn_matrix`). Grouped convs give the full
  row; conv group q's weights read the q-th contiguous block of it.

At most ``max_rows`` rows per layer are used (random rows, fixed seed).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import CalibrationError, MPPluginError, PatternError
from mp_plugin.layers.layout import kn_eligible, kn_input_columns, kn_matrix, kn_width
from mp_plugin.progress import progress

__all__ = [
    "GroupCovariance",
    "capture_covariances",
    "layer_input_rows",
    "run_batches",
    "call_model",
    "token_mask",
    "active_token_mask",
    "real_tokens",
    "eval_mode",
    "first_batch",
    "calibration_loss",
    "group_index",
]


@dataclass
class GroupCovariance:
    """Second moments of one layer's input, one n×n block per k:n group.

    Attributes:
        cov: (G, n, n) float64, C_g = mean over rows of h_g h_gᵀ (input units²);
            G = C_in·kh·kw / n over the full unfolded input, in the k:n layout.
        rows: number of input rows averaged.
        n: group size.
        scale_exp: the true second moments are ``cov · 4**scale_exp``. 0 unless the
            layer's inputs are so large or small (beyond 2^±250) that their squares
            would over- or underflow float64; CAST's choices do not depend on it.
    """

    cov: torch.Tensor
    rows: int
    n: int
    scale_exp: int = 0

    @property
    def groups(self) -> int:
        """G, the number of groups along the full unfolded input."""
        return int(self.cov.shape[0])

    @property
    def second_moment(self) -> torch.Tensor:
        """E[h²] per input column, in the k:n layout: (G·n,) float64."""
        diag = torch.diagonal(self.cov, dim1=-2, dim2=-1).reshape(-1)
        return diag if not self.scale_exp else _ldexp(diag, 2 * self.scale_exp)


def _ldexp(t: torch.Tensor, exp: int) -> torch.Tensor:
    """t · 2^exp in two steps (one step overflows 2^exp for |exp| > 1023)."""
    half = exp // 2
    for step in (half, exp - half):
        t = torch.ldexp(t, torch.tensor(float(step), dtype=t.dtype, device=t.device))
    return t


_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("mp_plugin_token_mask", default=None)


def token_mask(batch: Any) -> torch.Tensor | None:
    """The real-token mask of a token batch: its ``attention_mask`` (B, T) as bool, else None.

    A batch is a token batch when it is a dict with a 2-D ``attention_mask``
    (tensor or numpy array; 1 = real token, 0 = padding).
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask != 0


def active_token_mask() -> torch.Tensor | None:
    """The (B, T) bool mask of the token batch :func:`run_batches` is running now, or None."""
    return _TOKEN_MASK.get()


@contextlib.contextmanager
def real_tokens(mask: torch.Tensor | None) -> Iterator[None]:
    """Make ``mask`` (B, T) the active token mask inside the ``with`` block (None: every row counts)."""
    token = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the ``with`` block; every submodule's training flag is restored on exit.

    (``model.train(flag)`` would set all of them alike, losing e.g. a BatchNorm kept in eval mode
    inside a model being trained.)
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight multiplies: (rows, C_in·kh·kw) for conv, (B·T, in) for Linear.

    Under an active token mask (:func:`real_tokens`, set by :func:`run_batches` for
    token batches) a Linear input shaped (B, T, in) gives only its real tokens' rows. An
    input already flattened to 2-D keeps every row, padding included: whether it was
    flattened batch-major (B·T) or sequence-first (T·B) cannot be told from its shape.
    """
    if isinstance(module, nn.Linear):
        mask = _TOKEN_MASK.get()
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        two_d = isinstance(module, nn.Conv2d)
        if not two_d:
            x = x.unsqueeze(-2)
        pad = getattr(module, "_reversed_padding_repeated_twice", None)
        if pad is None or isinstance(module.padding, str) and module.padding == "valid":
            pad = [0] * (4 if two_d else 2)
        if not two_d:
            pad = list(pad) + [0, 0]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if any(pad):
            x = F.pad(x, tuple(pad), mode=mode)
        kernel = module.kernel_size if two_d else (1, module.kernel_size[0])
        dilation = module.dilation if two_d else (1, module.dilation[0])
        stride = module.stride if two_d else (1, module.stride[0])
        cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C_in·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise MPPluginError(f"cannot capture inputs of {type(module).__name__}: only Linear, Conv1d and Conv2d")


def _describe(obj: Any) -> str:
    """Short description of a batch: kind, shape and dtype."""
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
    if isinstance(obj, np.ndarray):
        return f"numpy array {obj.shape} {obj.dtype}"
    if isinstance(obj, Mapping):
        return "dict {" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(obj.items())[:6]) + "}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} (" + ", ".join(_describe(v) for v in list(obj)[:6]) + ")"
    return type(obj).__name__


def model_expects(model: nn.Module) -> str:
    """A sentence on what ``model`` takes: its forward signature and first layer's input."""
    try:
        sig = f"forward{inspect.signature(model.forward)}"
    except (TypeError, ValueError):
        sig = "forward(...)"
    first = ""
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        dtype = str(w.dtype).removeprefix("torch.") if isinstance(w, torch.Tensor) else "float"
        if isinstance(mod, nn.Embedding):
            first = f"integer token ids (B, T) below {mod.num_embeddings}"
        elif isinstance(mod, nn.Linear):
            first = f"a {dtype} tensor (..., {mod.in_features})"
        elif isinstance(mod, nn.Conv2d):
            first = f"a {dtype} tensor (B, {mod.in_channels}, H, W)"
        elif isinstance(mod, nn.Conv1d):
            first = f"a {dtype} tensor (B, {mod.in_channels}, L)"
        elif isinstance(mod, nn.Conv3d):
            first = f"a {dtype} tensor (B, {mod.in_channels}, D, H, W)"
        else:
            continue
        first = f"; its first layer in module order, {name or type(mod).__name__} ({type(mod).__name__}), takes {first}"
        break
    return f"{type(model).__name__}.{sig}{first}"


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the first parameter that holds data (CPU if none does) and the first floating dtype.

    A parameter on the meta device (offloaded by accelerate, whose hooks move the inputs to
    each module's execution device) names no device to send inputs to.
    """
    device, dtype = None, None
    for p in model.parameters():
        if device is None and not p.is_meta:
            device = p.device
        if dtype is None and p.is_floating_point():
            dtype = p.dtype
        if device is not None and dtype is not None:
            break
    return device or torch.device("cpu"), dtype or torch.get_default_dtype()


def _prepare(obj: Any, device: torch.device, dtype: torch.dtype, what: str) -> Any:
    """Numpy arrays → tensors, floating inputs in the model's floating dtype, tensors → the model's device;
    checks finiteness."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object or obj.dtype.kind not in "biuf":
            raise CalibrationError(f"{what}: numpy array of dtype {obj.dtype} cannot be a model input")
        t = torch.from_numpy(np.ascontiguousarray(obj))
        obj = t.to(dtype) if t.is_floating_point() else t
    if isinstance(obj, torch.Tensor):
        if obj.is_meta:
            raise CalibrationError(f"{what}: a tensor on the meta device holds no data")
        if obj.ndim and obj.shape[0] == 0:
            raise CalibrationError(f"{what} is empty: a tensor of shape {tuple(obj.shape)} holds no sample")
        if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not torch.isfinite(obj).all():
            raise CalibrationError(f"{what} contains NaN or Inf values: give finite inputs")
        if obj.is_floating_point() and dtype.is_floating_point and obj.dtype != dtype:
            obj = obj.to(dtype)  # e.g. float32 images for a bf16 model
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _prepare(v, device, dtype, what) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_prepare(v, device, dtype, what) for v in obj)
    if isinstance(obj, list):
        return [_prepare(v, device, dtype, what) for v in obj]
    return obj


def call_model(model: nn.Module, batch: Any, what: str = "calibration batch") -> Any:
    """Run one batch through ``model`` (tensor → ``model(x)``, tuple → ``model(*x)``, dict → ``model(**x)``).

    Numpy arrays are accepted where a tensor is meant (floating arrays take the
    model's floating dtype); tensors move to the model's device. The caller picks
    the grad mode.

    Raises:
        CalibrationError: the batch is not a tensor/array, tuple or dict, holds
            NaN/Inf, or the model fails on it; the message says which batch
            (``what``), what it was, the model's error and what the model expects.
    """
    if not isinstance(batch, (torch.Tensor, np.ndarray, tuple, Mapping)):
        raise CalibrationError(
            f"{what} must be a tensor, numpy array, tuple of model arguments or dict of keyword arguments, "
            f"got {type(batch).__name__}; {model_expects(model)}"
        )
    device, dtype = _model_device_dtype(model)
    data = _prepare(batch, device, dtype, what)
    try:
        if isinstance(data, Mapping):
            return model(**data)
        if isinstance(data, tuple):
            return model(*data)
        return model(data)
    except MPPluginError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model on the user's data
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CalibrationError(
            f"{what} ({_describe(batch)}) does not run through the model: {type(exc).__name__}: {msg}. "
            f"Expected: {model_expects(model)}"
        ) from exc


def run_batches(
    model: nn.Module,
    data: Any,
    show_progress: bool = False,
    desc: str = "calibration",
    *,
    stop: type[BaseException] | None = None,
    first: int = 0,
) -> None:
    """Run calibration data through ``model`` under ``torch.no_grad()``.

    ``data`` is one batch or a non-empty list of batches. A batch is a tensor or
    numpy array (``model(x)``), a tuple (``model(*args)``) or a dict
    (``model(**kwargs)``), see :func:`call_model`. While a token batch (a dict
    with an ``attention_mask``) runs, its mask is the active token mask, so hooks
    reading :func:`layer_input_rows` count only the real tokens. ``stop``: an
    exception a hook raises to end one batch's forward early (caught, the next
    batch runs). ``first``: the index of ``data[0]`` in the caller's list, for messages.

    Raises:
        CalibrationError: an empty list, or a batch that is malformed, non-finite
            or fails in the model (the message names the batch's index).
    """
    if isinstance(data, list) and not data:
        raise CalibrationError("calibration data is an empty list: give at least one batch")
    batches = data if isinstance(data, list) else [data]
    ended: tuple[type[BaseException], ...] = (stop,) if stop is not None else ()
    with torch.no_grad():
        for i, batch in enumerate(progress(batches, desc=desc, unit="batch", disable=not show_progress)):
            what = f"calibration batch {first + i}" if isinstance(data, list) else "calibration batch"
            with real_tokens(token_mask(batch)):
                try:
                    call_model(model, batch, what)
                except ended:  # a hook ended this batch's forward early
                    pass


def first_batch(data: Any) -> Any:
    """The first batch of calibration ``data`` (one batch or a list of batches, see
    :func:`run_batches`), or None for an empty list."""
    if isinstance(data, list):
        return data[0] if data else None
    return data


class _Accumulator:
    def __init__(self, module: nn.Module, n: int, max_rows: int, generator: torch.Generator) -> None:
        self.module = module
        self.n = n
        self.max_rows = max_rows
        self.generator = generator
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.shift: int | None = None  # rows are divided by 2^shift (0 unless they are beyond 2^±250)
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.calls += 1
        room = self.max_rows - self.rows
        if room <= 0 or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        rows = layer_input_rows(module, inputs[0].detach())
        if rows.shape[0] == 0:
            return
        if not kn_eligible(module.weight.shape, self.n):
            raise PatternError(f"layer input channels {kn_width(module.weight.shape)} are not divisible by n={self.n}")
        if module.weight.dim() > 2:
            rows = kn_input_columns(rows, int(module.in_channels), int(module.groups))
        if rows.shape[0] > room:
            pick = torch.randperm(rows.shape[0], generator=self.generator)[:room].to(rows.device)
            rows = rows.index_select(0, pick)
        g = rows.to(torch.float64).reshape(rows.shape[0], -1, self.n)
        if self.shift is None:
            peak = float(g.abs().max())
            exp = math.frexp(peak)[1] if 0.0 < peak < math.inf else 0
            self.shift = exp if abs(exp) > 250 else 0
        if self.shift:
            g = _ldexp(g, -self.shift)
        block = torch.einsum("rgi,rgj->gij", g, g)
        self.sum = block if self.sum is None else self.sum + block
        self.rows += int(rows.shape[0])


def capture_covariances(
    model: nn.Module,
    layers: Mapping[str, int],
    data: Any,
    max_rows: int = 4096,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, GroupCovariance]:
    """Capture the (G, n, n) input covariances of the named layers in one calibration pass.

    Args:
        model: the (dense) model; it runs in eval mode (BatchNorm statistics and
            dropout untouched) and its train/eval mode is restored afterwards.
        layers: ``{module name: group size n}``; each must be a Linear, Conv1d or Conv2d.
        data: calibration batch(es), see :func:`run_batches`.
        max_rows: at most this many input rows per layer: the first rows reached, in batch
            order (a random subset of the batch that crosses the limit); later batches add none.
        seed: seed of the row subsampling.
        show_progress: a tqdm bar over the calibration batches.

    Returns:
        ``{name: GroupCovariance}`` for every layer the forward pass reached
        (a layer never called is missing from the result).
    """
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    accs: dict[str, _Accumulator] = {}
    handles = []
    try:
        for name, n in layers.items():
            module = modules.get(name)
            if module is None:
                raise MPPluginError(f"the model has no module {name!r}")
            acc = _Accumulator(module, n, max_rows, gen)
            accs[name] = acc
            handles.append(module.register_forward_hook(acc))
        with eval_mode(model):  # every submodule's train flag comes back
            run_batches(model, data, show_progress=show_progress, desc="covariance capture")
    finally:
        for h in handles:
            h.remove()
    for name, acc in accs.items():
        if acc.calls and acc.sum is None:
            raise CalibrationError(
                f"layer {name!r} ran on the calibration data but received no input rows "
                "(an all-zero attention_mask, or empty inputs): give batches with real tokens"
            )
        if acc.sum is not None and not torch.isfinite(acc.sum).all():
            raise CalibrationError(
                f"layer {name!r}: its inputs on the calibration data are not finite (NaN/Inf) although the data is; "
                "check the model's weights and the scale of the calibration inputs"
            )
    return {
        name: GroupCovariance(acc.sum / acc.rows, acc.rows, acc.n, acc.shift or 0)
        for name, acc in accs.items()
        if acc.sum is not None
    }


def calibration_loss(weight_change: torch.Tensor, stats: GroupCovariance, conv_groups: int = 1) -> torch.Tensor:
    """Σ over rows i and groups g of r_{i,g}ᵀ C_g r_{i,g}, the CAST surrogate of output error.

    Args:
        weight_change: r = W − W' shaped like the weight (C_out, C_in/groups, *kernel).
        stats: the layer's :class:`GroupCovariance`.
        conv_groups: the conv's ``groups`` (row i of conv group q reads groups offset by q·G_w).

    Returns:
        A float64 scalar (input units² × weight units²).
    """
    r = kn_matrix(weight_change.detach()).to(torch.float64)
    rg = r.reshape(r.shape[0], -1, stats.n)
    cov = stats.cov.to(r.device)
    idx = group_index(r.shape[0], rg.shape[1], conv_groups, stats.groups, device=r.device)
    loss = torch.einsum("rga,rgab,rgb->", rg, cov[idx], rg)
    return loss if not stats.scale_exp else _ldexp(loss, 2 * stats.scale_exp)


def group_index(
    rows: int, groups_per_row: int, conv_groups: int, total_groups: int, device: Any = None
) -> torch.Tensor:
    """(rows, groups_per_row) indices into the layer's full list of covariance groups."""
    if groups_per_row * conv_groups != total_groups or rows % conv_groups:
        raise PatternError(
            f"covariance has {total_groups} groups but the weight has {groups_per_row} per row × {conv_groups} conv groups"
        )
    offset = (torch.arange(rows, device=device) // (rows // conv_groups)) * groups_per_row
    return offset[:, None] + torch.arange(groups_per_row, device=device)[None, :]
