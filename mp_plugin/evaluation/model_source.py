"""Where a command's model weights come from — never silently random.

:func:`load_named_model` is what the command line and the main job use:

* a ``checkpoint`` file: the named architecture with those weights (or a saved module);
* a built-in name (``efficientnet_lite0``, ``minilm``, the Fashion-MNIST zoo): its shipped weights;
* a timm name: timm's own pretrained weights (``pretrained=True``), read from the local
  Hugging Face cache first, so it works offline when they are cached, then downloaded
  unless ``HF_HUB_OFFLINE`` is set;
* random weights only when asked for (``random_init=True``, the ``--random-init`` flag).

When none applies it raises :class:`WeightsUnavailableError`, whose one-line message
names the two ways out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.models import BUILTIN_MODELS, load_model

__all__ = ["WeightsUnavailableError", "load_named_model", "weights_description"]


class WeightsUnavailableError(MPPluginError):
    """No real weights could be had for a model and random weights were not asked for."""


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub read only its local cache for the duration (no network retries)."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        yield
        return
    old = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if "local cache" in line or "LocalEntryNotFound" in type(exc).__name__:
        return "not in the local cache"
    return line[:160]


def load_named_model(
    name: str | None,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    random_init: bool = False,
    checkpoint_flag: str = "--checkpoint",
    allow_download: bool = True,
) -> nn.Module:
    """Load ``name`` with real weights, or random ones only when ``random_init``.

    Args:
        name: built-in or timm model name; None when ``checkpoint`` is a saved module.
        checkpoint: weights file (state_dict for ``name`` or a ``torch.save``'d module).
        num_classes: classifier size for timm names (pretrained heads are re-sized by timm).
        random_init: build a timm architecture with random weights on purpose.
        checkpoint_flag: the option that gives weights, named in the error message.
        allow_download: after a cache miss, let timm download (skipped when ``HF_HUB_OFFLINE`` is set).

    Returns:
        The model in eval mode.

    Raises:
        WeightsUnavailableError: a timm name whose pretrained weights are neither cached nor
            downloadable (or that has none), with no checkpoint and no ``random_init``.
        MPPluginError: unknown model, unreadable checkpoint, … (from :func:`load_model`).
    """
    if checkpoint is not None:
        return load_model(name, checkpoint=checkpoint, num_classes=num_classes)
    if name is None:
        raise MPPluginError(f"give a model name or {checkpoint_flag} FILE")
    if name in BUILTIN_MODELS:
        return load_model(name, num_classes=num_classes)  # refuses num_classes for a built-in
    if random_init:
        return load_model(name, pretrained=False, num_classes=num_classes)
    try:
        with _hub_offline():
            return load_model(name, pretrained=True, num_classes=num_classes)
    except WeightsUnavailableError:
        raise
    except Exception as cached_miss:  # noqa: BLE001 - any failure of the cache read falls through
        reason = _first_line(cached_miss)
        if _is_unknown_model(name):
            raise
    if allow_download and not _offline_env():
        try:
            return load_model(name, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001 - reported in one line below
            reason = _first_line(exc)
    raise WeightsUnavailableError(
        f"no pretrained weights for {name!r} could be loaded ({reason}); give {checkpoint_flag} FILE, "
        "or --random-init to use random weights on purpose"
    )


def _is_unknown_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return True
    return name not in timm.list_models() and not timm.is_model(name)


def weights_description(name: str | None, checkpoint: str | None, random_init: bool) -> str:
    """A few words saying where the weights came from, for the command's log."""
    if checkpoint is not None:
        return f"weights from {checkpoint}"
    if name in BUILTIN_MODELS:
        return "shipped pretrained weights"
    if random_init:
        return "RANDOM weights (--random-init)"
    return "timm pretrained weights"
