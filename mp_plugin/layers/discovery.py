"""Find the prunable layers of any PyTorch model.

A target layer is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` whose weight
is read as a C_out × (C_in·kh·kw) matrix. timm's fused ``attn.qkv`` is one
matrix. Each target gets a type (attention / MLP / other) from its qualified
name. :class:`LayerSelection` holds the exclusion rules; by default grouped and
depthwise convs, the stem conv (C_in = 3) and the classifier head are left out.
A weight shared by several modules (tied embeddings, reused blocks) is counted
once, under its first name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mp_plugin.errors import ConfigError
from mp_plugin.layers.offload import weight_identity

__all__ = ["LayerSelection", "TargetLayer", "SkippedLayer", "find_target_layers", "classify_layer_type"]

LayerType = Literal["attn", "mlp", "other"]

_ATTN = re.compile(r"(attn|attention|self_attn|(^|\.)(q|k|v|o)_proj$|(^|\.)qkv$|(^|\.)(query|key|value)$|out_proj$)")
_MLP = re.compile(
    r"(mlp|ffn|feed_forward|intermediate|(^|\.)fc\d*$|(^|\.)output\.dense$|gate_proj|up_proj|down_proj|pwconv\d*$)"
)
_HEAD_NAMES = {"head", "fc", "classifier", "_fc", "lm_head", "last_linear", "logits", "score"}


def classify_layer_type(name: str) -> LayerType:
    """Return ``"attn"``, ``"mlp"`` or ``"other"`` from a module's qualified name."""
    low = name.lower()
    if _ATTN.search(low):
        return "attn"
    if _MLP.search(low):
        return "mlp"
    return "other"


@dataclass
class LayerSelection:
    """Which layers are pruning targets.

    Attributes:
        include_linear / include_conv: module families to consider.
        exclude_grouped: skip convs with groups > 1 (depthwise included).
        exclude_stem: skip convs whose C_in ≤ ``stem_channels`` (the image stem).
        exclude_head: skip the classifier head (timm ``get_classifier()``, a Hugging
            Face model's ``get_output_embeddings()`` such as ``lm_head``, else the last
            Linear when its name is a usual head name such as ``score``).
        exclude_embeddings: skip a Linear whose weight is an ``nn.Embedding``'s weight
            (tied input/output embeddings): pruning it would prune the embedding too.
        exclude: regular expressions; a matching qualified name is skipped.
        include_only: if set, only names matching one of these are kept.
        min_dim: skip matrices whose smaller side is below this.
    """

    include_linear: bool = True
    include_conv: bool = True
    exclude_grouped: bool = True
    exclude_stem: bool = True
    stem_channels: int = 3
    exclude_head: bool = True
    exclude_embeddings: bool = True
    exclude: list[str] = field(default_factory=list)
    include_only: list[str] = field(default_factory=list)
    min_dim: int = 2

    def __post_init__(self) -> None:
        for name in ("exclude", "include_only"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):  # a str would be read letter by letter
                raise ConfigError(f"LayerSelection.{name} must be a list of regular expressions, got {value!r}")
            for pattern in value:
                if not isinstance(pattern, str):
                    raise ConfigError(f"LayerSelection.{name} holds {pattern!r}, not a regular expression string")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(
                        f"LayerSelection.{name}: {pattern!r} is not a regular expression ({exc})"
                    ) from exc
            setattr(self, name, list(value))
        for name in ("min_dim", "stem_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"LayerSelection.{name} must be an integer ≥ 0, got {value!r}")

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return dict(self.__dict__)


@dataclass
class TargetLayer:
    """One prunable layer.

    Attributes:
        name: qualified module name.
        module: the module itself.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        layer_type: ``"attn"``, ``"mlp"`` or ``"other"``.
        shape: (rows, cols) of the 2-D view: (C_out, C_in·kh·kw).
        aliases: other module names sharing this weight.
    """

    name: str
    module: nn.Module
    kind: str
    layer_type: LayerType
    shape: tuple[int, int]
    aliases: list[str] = field(default_factory=list)

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight parameter (C_out, C_in, *kernel)."""
        return self.module.weight


@dataclass
class SkippedLayer:
    """A Linear/Conv that was not selected, and why."""

    name: str
    reason: str


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    return None


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """The model's output heads: timm's classifier, a Hugging Face output embedding, else a last Linear named like a head."""
    heads: list[nn.Module] = []
    for getter_name in ("get_classifier", "get_output_embeddings"):
        getter = getattr(model, getter_name, None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - third-party models may raise anything here
            head = None
        if isinstance(head, nn.Module) and _kind(head) is not None:
            heads.append(head)
    if heads:
        return heads
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is not None:  # torchvision puts its head in a Sequential: "classifier.1" is named by "classifier"
        named = next((p for p in reversed(last[0].split(".")) if not p.isdigit()), "")
        if named in _HEAD_NAMES:
            return [last[1]]
    return []


def _matrix_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(out, in·kernel) of a Linear/Conv weight, also for an empty one."""
    return int(weight.shape[0]), int(math.prod(weight.shape[1:]))


def _skip_reason(
    name: str,
    module: nn.Module,
    kind: str,
    key: Any,
    sel: LayerSelection,
    heads: list[nn.Module],
    embeddings: dict,
    excl: list[re.Pattern],
    only: list[re.Pattern],
) -> str | None:
    """Why the selection leaves this module out (None: it is a target, unless its weight is shared)."""
    reason = None
    if kind == "linear" and not sel.include_linear:
        reason = "Linear layers excluded"
    elif kind != "linear" and not sel.include_conv:
        reason = "conv layers excluded"
    elif kind != "linear" and module.groups > 1:
        reason = "grouped/depthwise conv" if sel.exclude_grouped else None
    if reason is None and kind != "linear" and sel.exclude_stem and module.in_channels <= sel.stem_channels:
        reason = f"stem conv (C_in={module.in_channels})"
    if reason is None and any(module is h for h in heads):
        reason = "classifier head"
    if reason is None and key in embeddings:
        reason = f"weight tied to the input embedding {embeddings[key]}"
    if reason is None and any(p.search(name) for p in excl):
        reason = "excluded by name"
    if reason is None and only and not any(p.search(name) for p in only):
        reason = "not in include_only"
    shape = _matrix_shape(module.weight)
    if reason is None and min(shape) < sel.min_dim:
        reason = f"matrix {shape[0]}×{shape[1]} smaller than min_dim={sel.min_dim}"
    return reason


def find_target_layers(
    model: nn.Module, selection: LayerSelection | None = None
) -> tuple[list[TargetLayer], list[SkippedLayer]]:
    """Walk ``model`` and return (targets, skipped) in module order.

    Args:
        model: any ``nn.Module``.
        selection: exclusion rules; defaults to :class:`LayerSelection()`.

    Returns:
        The selected :class:`TargetLayer` list and a :class:`SkippedLayer` list
        naming every Linear/Conv left out with its reason.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch nn.Module, got {type(model).__name__}")
    sel = selection or LayerSelection()
    heads = _head_modules(model) if sel.exclude_head else []
    embeddings = {
        weight_identity(m): name
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and sel.exclude_embeddings
    }
    excl = [re.compile(p) for p in sel.exclude]
    only = [re.compile(p) for p in sel.include_only]
    entries: list[tuple[str, nn.Module, str, Any, str | None]] = []  # name, module, kind, weight key, reason
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            entries.append((name, module, kind, None, "no weight tensor"))
            continue
        key = weight_identity(module)  # offloaded ties are seen in accelerate's store
        entries.append(
            (name, module, kind, key, _skip_reason(name, module, kind, key, sel, heads, embeddings, excl, only))
        )
    # a weight shared with a module left out is left out everywhere: pruning an alias prunes it too
    left_out = {}
    for name, _, _, key, reason in entries:
        if key is not None and reason is not None and key not in left_out:
            left_out[key] = (name, reason)
    seen: dict[Any, TargetLayer] = {}
    targets: list[TargetLayer] = []
    skipped: list[SkippedLayer] = []
    for name, module, kind, key, reason in entries:
        if key is not None and key in seen:
            seen[key].aliases.append(name)
            skipped.append(SkippedLayer(name, f"shares its weight with {seen[key].name}"))
            continue
        if reason is None and key in left_out:
            other, why = left_out[key]
            reason = f"shares its weight with {other} ({why})"
        if reason is not None:
            skipped.append(SkippedLayer(name, reason))
            continue
        layer = TargetLayer(name, module, kind, classify_layer_type(name), _matrix_shape(module.weight))
        seen[key] = layer
        targets.append(layer)
    return targets, skipped
