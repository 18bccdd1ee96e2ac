"""Which modules and functions a channel permutation can pass through, and how to fold it into them.

A *channel op* maps channel c of its input to channel c of its output (per-channel
affine maps, norms over the channel axis, elementwise activations, spatial
pooling, depthwise convs). Permuting its input channels by π permutes its
output channels by π once its own per-channel tensors are permuted by π too.
The channel axis is written ``-1`` (Linear layout, channels last) or ``1``
(conv layout, N×C×…).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelOp", "module_channel_op", "is_producer", "is_consumer", "permute_tensor_"]

# elementwise, parameter-free modules (any channel axis)
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign, nn.LogSigmoid,
)  # fmt: skip
# per-channel spatial pooling (channel axis 1)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip

ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu,
    F.mish, F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
    torch.exp, torch.abs, torch.neg, torch.square, torch.sqrt, torch.erf, operator.neg, torch.nn.functional.relu_,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "exp", "abs", "neg", "square", "sqrt", "erf", "contiguous", "float", "half", "to", "type_as", "detach",
    "hardtanh", "hardtanh_",
}  # fmt: skip
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


@dataclass
class ChannelOp:
    """How a module passes a channel permutation.

    Attributes:
        axis: required channel axis (1 or -1), or None for any.
        tensors: (attribute name, axis of the channel in that tensor) to permute.
    """

    axis: int | None
    tensors: list[tuple[str, int]]


def is_producer(module: nn.Module) -> bool:
    """A layer whose output channels are the rows of its weight: Linear or ungrouped Conv1d/2d."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


def is_consumer(module: nn.Module) -> bool:
    """A layer whose input channels are the columns of its weight: Linear or ungrouped Conv1d/2d."""
    return is_producer(module)


def producer_axis(module: nn.Module) -> int:
    """Channel axis of the module's output / input: -1 for Linear, 1 for conv."""
    return -1 if isinstance(module, nn.Linear) else 1


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def module_channel_op(module: nn.Module, channels: int) -> tuple[ChannelOp | None, str]:
    """Return (op, "") when ``module`` passes a permutation of ``channels`` channels, else (None, why)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.num_features != channels:
            return None, f"BatchNorm has {module.num_features} features, expected {channels}"
        extra = [name for name, child in module.named_children() if _has_params(child)]
        if extra:
            return None, f"BatchNorm subclass with parameterised children {extra}"
        names = [
            (n, 0) for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n, None) is not None
        ]
        return ChannelOp(1, names), ""
    if type(module) is nn.LayerNorm:
        if tuple(module.normalized_shape) != (channels,):
            return None, f"LayerNorm over {tuple(module.normalized_shape)}, not over the {channels} channels"
        return ChannelOp(-1, [(n, 0) for n in ("weight", "bias") if getattr(module, n, None) is not None]), ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1:
        if module.groups == module.in_channels == module.out_channels == channels:
            return ChannelOp(1, [(n, 0) for n in ("weight", "bias") if getattr(module, n, None) is not None]), ""
        return None, f"grouped conv (groups={module.groups}) mixes channels within groups"
    if isinstance(module, _ELEMENTWISE_MODULES) and not _has_params(module):
        return ChannelOp(None, []), ""
    if isinstance(module, _POOL_MODULES):
        return ChannelOp(1, []), ""
    return None, f"module type {type(module).__name__} is not known to act per channel"


def permute_tensor_(tensor: torch.Tensor, perm: torch.Tensor, axis: int) -> None:
    """Reorder ``tensor`` in place along ``axis`` so that new index s holds old index perm[s]."""
    with torch.no_grad():
        tensor.copy_(tensor.index_select(axis, perm.to(tensor.device)))
