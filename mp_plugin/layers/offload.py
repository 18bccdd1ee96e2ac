"""Layers offloaded by Hugging Face ``accelerate``: bring a weight in, and write a changed weight back.

A model dispatched by ``accelerate`` (``cpu_offload``, ``disk_offload``, ``dispatch_model``
with a ``device_map`` that sends modules to ``"cpu"`` or ``"disk"``) keeps each offloaded
module's weight on the meta device; its ``AlignDevicesHook`` (``module._hf_hook``) loads the
weight from ``hook.weights_map`` before every forward and drops it after. That map is the
*offload store*: a ``PrefixedDataset`` (the module's name + ``"."``) over either a plain dict of
CPU tensors (``cpu_offload``) or an ``OffloadedWeightsLoader`` (a dict of CPU tensors and/or an
index of ``<name>.dat`` memory-mapped files or safetensors entries in an offload folder).

* :func:`onloaded` brings weights in for a block with accelerate's own
  ``align_module_device`` and releases them after it, one module (or one work unit) at a time.
* :func:`write_back` stores a module's changed weight in its offload store, so the next
  forward (the hook reloads from the store) sees it: a tensor in a dict is overwritten in
  place (same dtype and device); a ``.dat`` file is rewritten with accelerate's
  ``offload_weight`` in the dtype its index records; a weight that came from a safetensors
  file (a checkpoint that must not be modified) is written as a new ``<name>.dat`` in the
  loader's offload folder and its index entry is pointed at that file (``index.json`` there
  is updated with ``save_offload_index``).

The core never imports accelerate: an offloaded model has loaded it, and it is reached
through ``sys.modules``.

Tied weights: accelerate gives each offloaded module its own meta tensor, so the tie is seen
in the store instead (:func:`weight_identity`): one tensor under two keys of a CPU dict, or two
keys naming the same entry of one safetensors file. Each ``.dat`` file written by
``disk_offload`` holds its own copy, so modules stored that way are not tied at run time and
stay separate layers.

Not handled: modules offloaded through a parent's hook (``preload_module_classes``), whose
own weight has no hook of its own (``plan`` and ``apply`` refuse them by name,
:func:`preload_reason`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError

__all__ = [
    "first_offloaded",
    "is_offloaded",
    "offloading_ancestor",
    "onloaded",
    "preload_reason",
    "weight_identity",
    "write_back",
    "write_back_problem",
]


def is_offloaded(module: nn.Module) -> bool:
    """True for a module whose weight accelerate offloaded (meta tensor behind an ``_hf_hook``)."""
    weight = getattr(module, "weight", None)
    return getattr(module, "_hf_hook", None) is not None and isinstance(weight, torch.Tensor) and weight.is_meta


def weight_identity(module: nn.Module) -> tuple:
    """A key equal for two modules that run on the same weight tensor, offloaded or not.

    In memory it is the weight object's identity. For an accelerate-offloaded module it is
    where the store keeps the weight: the stored tensor's memory (a CPU dict, where
    ``cpu_offload`` puts one tensor under both keys of a tied pair), the (file, tensor name)
    of a safetensors entry, or the key's own ``.dat`` file. A store this cannot read falls
    back to the module's own meta tensor (never tied to another).
    """
    weight = getattr(module, "weight", None)
    if not is_offloaded(module):
        return ("object", id(weight))
    try:
        kind, target, key = _locate(_weights_map(module), "weight")
    except MPPluginError:
        return ("object", id(weight))
    if kind == "dict":
        stored = target[key]
        if isinstance(stored, torch.Tensor) and not stored.is_meta:
            return ("stored", stored.device.type, stored.data_ptr(), tuple(stored.shape), stored.dtype)
        return ("object", id(weight))
    info = target.index[key]
    if "safetensors_file" in info:
        return ("safetensors", os.path.abspath(info["safetensors_file"]), info.get("weight_name", key))
    return ("dat", os.path.abspath(str(target.save_folder)), key)


def first_offloaded(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` whose weight accelerate offloaded, or None."""
    return next((name for name, m in model.named_modules() if is_offloaded(m)), None)


def offloading_ancestor(model: nn.Module, name: str) -> str | None:
    """The name of the nearest ancestor of module ``name`` that carries an accelerate offload hook, or None.

    A module offloaded through a parent's hook (``preload_module_classes``) has a meta weight and no
    hook of its own; only the parent's forward brings it in.
    """
    modules = dict(model.named_modules())
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        hook = getattr(modules.get(prefix), "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False):
            return prefix or "<model>"
    return None


def preload_reason(model: nn.Module, name: str) -> str | None:
    """Why layer ``name`` (weight on meta) cannot be brought in one at a time, when a parent offloads it; else None."""
    parent = offloading_ancestor(model, name)
    if parent is None:
        return None
    return (
        f"layer {name!r} is offloaded through its parent {parent!r}'s accelerate hook (preload_module_classes), "
        "which cannot be brought in one layer at a time; offload without preload_module_classes (e.g. a "
        "device_map) or load the model in memory"
    )


def _accelerate_utils() -> Any:
    utils = sys.modules.get("accelerate.utils")
    if utils is None or not hasattr(utils, "align_module_device"):
        raise MPPluginError("an accelerate-offloaded layer needs accelerate>=1.0 loaded to bring it in")
    return utils


@contextlib.contextmanager
def onloaded(modules: Sequence[nn.Module], write: bool = False) -> Iterator[None]:
    """Inside the block, accelerate-offloaded ``modules`` hold their weights on their execution device.

    Uses ``accelerate.utils.align_module_device`` of the accelerate that offloaded them;
    other modules are untouched. With ``write=True``, when the block ends without an
    exception each offloaded module's weight is stored back (:func:`write_back`) before it
    is released, so a change made in the block is what the model's next forward uses.

    Raises:
        MPPluginError: accelerate is not loaded, or its hook did not bring the weight in
            (a hook other than ``AlignDevicesHook`` with ``offload=True``).
    """
    offloaded = [m for m in modules if is_offloaded(m)]
    with contextlib.ExitStack() as stack:
        for module in offloaded:
            stack.enter_context(_accelerate_utils().align_module_device(module))
            if module.weight.is_meta:
                raise MPPluginError(
                    f"accelerate's hook {type(module._hf_hook).__name__} on a {type(module).__name__} did not bring "
                    "its weight in (align_module_device needs an AlignDevicesHook with offload=True)"
                )
        yield
        if write:
            for module in offloaded:
                write_back(module)


def write_back(module: nn.Module, names: Sequence[str] = ("weight",)) -> None:
    """Store ``module``'s current (brought in, changed) tensors ``names`` in accelerate's offload store.

    Call it inside :func:`onloaded` (the tensors must hold data). The store keeps its
    dtype: a weight stored in float32 for a float16 module is written back in float32.
    Memory stays bounded by one tensor: nothing else of the store is loaded.

    Raises:
        MPPluginError: the module has no offload hook with a weights map, a tensor is not
            brought in, or the store is of a kind this does not know how to update.
    """
    store = _weights_map(module)
    for name in names:
        value = getattr(module, name)
        if not isinstance(value, torch.Tensor) or value.is_meta:
            raise MPPluginError(f"{name} of {type(module).__name__} holds no data: bring it in (onloaded) first")
        kind, target, key = _locate(store, name)
        if kind == "dict":
            _overwrite(target, key, value.detach())
        else:
            _rewrite_file(target, key, value.detach())


def write_back_problem(module: nn.Module, names: Sequence[str] = ("weight",)) -> str | None:
    """Why :func:`write_back` would fail for this offloaded module (None: it would not), found without writing.

    ``apply`` asks this of every offloaded layer it will prune before it changes any, so an
    unwritable store fails up front instead of after earlier layers were pruned.
    """
    try:
        store = _weights_map(module)
        for name in names:
            kind, target, _ = _locate(store, name)
            if kind == "file" and target.save_folder is None:
                return _NO_FOLDER
    except MPPluginError as exc:
        return str(exc)
    return None


_NO_FOLDER = (
    "the weight lives in a checkpoint file and accelerate's loader has no offload folder to write the changed "
    "weight to; load the model with an offload folder (transformers: from_pretrained(..., offload_folder=DIR); "
    "accelerate: dispatch_model(..., offload_dir=DIR))"
)


def _weights_map(module: nn.Module) -> Any:
    hook = getattr(module, "_hf_hook", None)
    store = getattr(hook, "weights_map", None)
    if store is None or not getattr(hook, "offload", False):
        raise MPPluginError(
            f"{type(module).__name__} has no accelerate offload hook with a weights map to write its weights back to"
        )
    return store


def _locate(store: Any, key: str) -> tuple[str, Any, str]:
    """Where ``key`` lives in an accelerate weights map: ("dict", mapping, key) or ("file", loader, key)."""
    while hasattr(store, "dataset") and hasattr(store, "prefix"):  # PrefixedDataset, possibly nested
        key, store = f"{store.prefix}{key}", store.dataset
    if hasattr(store, "state_dict") and hasattr(store, "index") and hasattr(store, "save_folder"):
        if key in store.state_dict:  # OffloadedWeightsLoader: its state dict (CPU tensors) comes first
            return "dict", store.state_dict, key
        if key in store.index:
            return "file", store, key
        raise MPPluginError(f"{key!r} is not in accelerate's offloaded weights; cannot write it back")
    if isinstance(store, MutableMapping) and key in store:
        return "dict", store, key
    raise MPPluginError(f"cannot write {key!r} back into an accelerate weights map of type {type(store).__name__}")


def _overwrite(tensors: MutableMapping, key: str, value: torch.Tensor) -> None:
    old = tensors[key]
    if not isinstance(old, torch.Tensor) or tuple(old.shape) != tuple(value.shape):
        raise MPPluginError(f"offloaded {key!r} is not a tensor of shape {tuple(value.shape)}; cannot write it back")
    same_memory = (
        old.device == value.device
        and old.dtype == value.dtype
        and old.data_ptr() == value.data_ptr()
        and old.stride() == value.stride()
    )
    if not same_memory:  # e.g. cpu_offload to a CPU execution device: the loaded weight *is* the stored tensor
        with torch.no_grad():
            old.copy_(value)  # in place: a tensor stored under two tied keys stays one tensor


def _rewrite_file(loader: Any, key: str, value: torch.Tensor) -> None:
    info = loader.index[key]
    folder = loader.save_folder
    if folder is None:
        raise MPPluginError(f"offloaded {key!r} ({info.get('safetensors_file', 'a file')!r}): {_NO_FOLDER}")
    utils = _accelerate_utils()
    dtype = getattr(torch, str(info.get("dtype", "")), None)
    dtype = dtype if isinstance(dtype, torch.dtype) else value.dtype
    entry: dict = {}
    os.makedirs(folder, exist_ok=True)  # dispatch_model creates it only when it offloads weights itself
    utils.offload_weight(value.to(device="cpu", dtype=dtype), key, folder, index=entry)
    loader.index[key] = entry[key]  # a safetensors entry now points at the new .dat file
    utils.save_offload_index(entry, folder)
