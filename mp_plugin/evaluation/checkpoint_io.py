"""Reading checkpoint files and loading them into a model, with named errors.

:func:`read_checkpoint` turns every way a file can be unreadable (missing, a
directory, empty, truncated, a corrupt safetensors header, a broken pickle)
into a :class:`~mp_plugin.errors.CheckpointError` that names the file.
:func:`load_state_into` checks a state_dict against the architecture before
loading it (missing, unexpected and size-mismatched keys are listed), and
keeps the checkpoint's floating dtypes: an fp16 checkpoint loads as an fp16
model, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import CheckpointError

__all__ = ["read_checkpoint", "load_state_into"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def read_checkpoint(path: str | Path, metadata_key: str | None = None) -> tuple[Any, Any]:
    """Read ``path`` (``.safetensors``, or anything ``torch.load`` reads) → (object, metadata record).

    Args:
        path: the checkpoint file.
        metadata_key: for safetensors, a metadata entry holding JSON to return as the record.

    Returns:
        (the loaded object — a state_dict, a module, or whatever was saved —, the decoded
        metadata record or None).

    Raises:
        CheckpointError: the file is missing, a directory, empty, or cannot be decoded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(inside[:3])}: give that file)" if inside else ""
        raise CheckpointError(f"checkpoint {path} is a directory, not a file{hint}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(exc)})") from exc
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): was it written completely?")
    record = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(metadata_key) if metadata_key else None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own and OS/format errors
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file ({_first_line(exc)}); "
                "is it truncated or corrupt?"
            ) from exc
        if raw:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CheckpointError(
                    f"checkpoint {path}: metadata {metadata_key!r} is not valid JSON ({exc})"
                ) from exc
        return obj, record
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors of a damaged file
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file ({_first_line(exc)}); is it truncated or corrupt?"
        ) from exc
    return obj, record


def _set_dtype(model: nn.Module, key: str, dtype: torch.dtype) -> None:
    """Give the parameter or buffer ``key`` of ``model`` the floating dtype ``dtype`` (ties kept)."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters and owner._parameters[attr] is not None:
        param = owner._parameters[attr]
        if param.dtype != dtype:
            param.data = param.data.to(dtype)  # the same Parameter object: tied modules follow
    elif attr in owner._buffers and owner._buffers[attr] is not None:
        owner._buffers[attr] = owner._buffers[attr].to(dtype)


def load_state_into(model: nn.Module, state: dict, path: str | Path, name: str | None = None) -> None:
    """Load ``state`` into ``model`` exactly: every key present, every shape equal, dtypes kept.

    A floating tensor of the checkpoint whose dtype differs from the model's (e.g. an
    fp16 checkpoint into a freshly built fp32 model) turns the model's tensor into the
    checkpoint's dtype first, so the loaded values and dtypes are those saved.

    Raises:
        CheckpointError: a non-tensor entry, missing/unexpected keys, or size mismatches
            (the checkpoint is of another architecture); the message lists examples.
    """
    label = repr(name) if name else type(model).__name__
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:3]} are not tensors; a state_dict maps names to tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    sizes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or sizes:
        parts = []
        if sizes:
            parts.append(f"{len(sizes)} size mismatches (e.g. {'; '.join(sizes[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise CheckpointError(f"{path} does not match the architecture {label}: {', '.join(parts)}")
    for key, value in state.items():
        if value.is_floating_point() and own[key].is_floating_point() and value.dtype != own[key].dtype:
            _set_dtype(model, key, value.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not load into {label} ({_first_line(exc)})") from exc
