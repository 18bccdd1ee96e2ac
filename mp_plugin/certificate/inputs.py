"""Input handling for the certificate: batches, logits, labels, architectures, parametrizations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import ArchitectureMismatchError, CertificateInputError, MPPluginError, NonFiniteActivationError

__all__ = [
    "Batch",
    "batch_size",
    "numpy_to_torch",
    "move_batch",
    "forward_logits",
    "check_labels",
    "check_same_architecture",
    "model_device",
    "LAYER_TYPES",
    "linear_layers",
]

Batch = Any  # a tensor (model(x)), a tuple/list (model(*x)) or a mapping (model(**x))

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _first_tensor(batch: Batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    values = (
        list(batch.values()) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (tuple, list)) else []
    )
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise CertificateInputError(
        f"batch must be a tensor, a tuple/list or a dict of tensors, got {type(batch).__name__}"
    )


def numpy_to_torch(batch: Batch, dtype: torch.dtype | None = None) -> Batch:
    """``batch`` with numpy arrays (top level, or inside a tuple/list/dict) turned into tensors.

    Floating arrays take ``dtype`` (the model's floating dtype; default: torch's default).
    """
    import numpy as np

    dtype = dtype or torch.get_default_dtype()

    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            t = torch.from_numpy(np.ascontiguousarray(v))
            return t.to(dtype) if t.is_floating_point() else t
        return v

    if isinstance(batch, Mapping):
        return {k: conv(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(conv(v) for v in batch)
    return conv(batch)


def batch_size(batch: Batch) -> int:
    """Number of samples |T| in ``batch`` (leading dimension of its first tensor)."""
    t = _first_tensor(batch)
    if t.ndim == 0 or t.shape[0] == 0:
        raise CertificateInputError("the batch is empty: the certificate needs at least one sample")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteActivationError("the input batch contains NaN or Inf")
    return int(t.shape[0])


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return type(batch)(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU when it has none)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def forward_logits(model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
    """Run ``model`` on ``batch`` and return its (n, K) logits; checks shape and finiteness."""
    try:
        if isinstance(batch, torch.Tensor):
            out = model(batch)
        elif isinstance(batch, Mapping):
            out = model(**batch)
        else:
            out = model(*batch)
    except MPPluginError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failing on the user's batch
        from mp_plugin.layers.calibration import model_expects

        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CertificateInputError(
            f"the batch does not run through the model: {type(exc).__name__}: {msg}. Expected: {model_expects(model)}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        logits = getattr(out, "logits", None)
        out = logits if isinstance(logits, torch.Tensor) else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CertificateInputError(f"the model must return ({n}, K) logits for a batch of {n}, got {shape}")
    if out.shape[1] < 2:
        raise CertificateInputError("margins need at least 2 classes; the model returns 1 logit per sample")
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteActivationError("the model's logits contain NaN or Inf on this batch")
    return out


def check_labels(labels: torch.Tensor | None, n: int, k: int) -> torch.Tensor | None:
    """Validate integer class labels of shape (n,) in [0, k)."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise CertificateInputError(f"labels must have shape ({n},) to match the batch, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise CertificateInputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise CertificateInputError(
            f"labels must lie in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


def check_same_architecture(dense: nn.Module, pruned: nn.Module) -> None:
    """Raise :class:`ArchitectureMismatchError` unless both models have the same modules and shapes."""
    dm = [(n, type(m).__name__) for n, m in dense.named_modules()]
    pm = [(n, type(m).__name__) for n, m in pruned.named_modules()]
    if dm != pm:
        for a, b in zip(dm + [("<end>", "")] * len(pm), pm + [("<end>", "")] * len(dm)):
            if a != b:
                raise ArchitectureMismatchError(
                    f"pruned model differs from the dense one: dense has {a[1]} at '{a[0]}', pruned has {b[1]} at '{b[0]}'"
                )
    ds, ps = dense.state_dict(), pruned.state_dict()
    if ds.keys() != ps.keys():
        only = sorted(set(ds) ^ set(ps))[:3]
        raise ArchitectureMismatchError(f"pruned and dense state_dicts have different keys, e.g. {only}")
    for key, value in ds.items():
        if isinstance(value, torch.Tensor) and value.shape != ps[key].shape:
            raise ArchitectureMismatchError(
                f"'{key}' has shape {tuple(value.shape)} in the dense model and {tuple(ps[key].shape)} in the pruned one"
            )


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1d/Conv2d module (subclasses included) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
