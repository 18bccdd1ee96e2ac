"""Which modules and functions a channel permutation can pass through, and how to fold it into them.

A *channel op* maps channel c of its input to channel c of its output (per-channel
affine maps, norms over the channel axis, elementwise activations, spatial
pooling, depthwise convs). Permuting its input channels by π permutes its
output channels by π once its own per-channel tensors are permuted by π too.
The channel axis is written ``-1`` (Linear layout, channels last) or ``1``
(conv layout, N×C×…).
"""

from __future__ import annotations

import copy
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ChannelOp",
    "module_channel_op",
    "is_producer",
    "is_consumer",
    "permute_tensor_",
    "pool_dims",
    "not_plain_reason",
]

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
POOL_1D_MODULES = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def pool_dims(module_or_function: object) -> int | None:
    """Spatial dimensions a pooling module or function expects (1 or 2), None for anything else.

    A 2-D pool on a Conv1d's (N, C, L) output treats it as one unbatched (C, L) image and
    pools across channels, so the pool must match the producer's dimensions.
    """
    if module_or_function in POOL_FUNCTIONS or isinstance(
        module_or_function, tuple(set(_POOL_MODULES) - set(POOL_1D_MODULES))
    ):
        return 2
    if isinstance(module_or_function, POOL_1D_MODULES):
        return 1
    return None


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


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


_EQUIVARIANT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_layer(module: nn.Module) -> bool:
    """A Linear/Conv1d/Conv2d whose weight rows are its output channels and whose columns meet its input channels.

    The base classes are. A subclass with its own forward, extra tensors or children (timm
    ``ScaledStdConv2d``'s per-channel ``gain``, a static-padding conv) is probed once on a
    random copy (:func:`_probe_equivariant`): permuting its weight rows and bias must permute
    its output channels, and permuting its weight columns must undo a permutation of its input.
    """
    base = next((b for b in _LAYERS if isinstance(module, b)), None)
    if base is None:
        return False
    if parametrize.is_parametrized(module) or "weight" not in module._parameters:
        return True  # a computed weight (weight_norm…): the graph walk refuses it with its own reason
    own = {name for name, _ in module.named_parameters(recurse=False)}
    own |= {name for name, _ in module.named_buffers(recurse=False)}
    methods = ("forward",) if base is nn.Linear else ("forward", "_conv_forward")
    if (
        type(module) is base
        or all(getattr(type(module), m) is getattr(base, m) for m in methods)
        and own <= {"weight", "bias"}
        and not any(True for _ in module.children())
    ):
        return True
    if module not in _EQUIVARIANT:
        _EQUIVARIANT[module] = _probe_equivariant(module)
    return _EQUIVARIANT[module]


@torch.no_grad()
def _probe_equivariant(module: nn.Module) -> bool:
    """Whether a random-weight copy of ``module`` passes permutations of its rows and columns exactly."""
    groups = getattr(module, "groups", 1)
    depthwise = groups > 1 and groups == module.weight.shape[0] == module.in_channels
    if groups != 1 and not depthwise:
        return False
    try:
        probe = copy.deepcopy(module).float().cpu().eval()
        gen = torch.Generator().manual_seed(0)
        for t in [*probe.parameters(), *probe.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + 1.0)  # per-channel gains stay away from 0
        w = probe.weight
        if isinstance(probe, nn.Linear):
            x = torch.randn(3, w.shape[1], generator=gen)
            axis = -1
        else:
            reach = [(k - 1) * d + 1 for k, d in zip(probe.kernel_size, probe.dilation)]
            size = [2 * r + 5 for r in reach]
            x = torch.randn(2, probe.in_channels, *size, generator=gen)
            axis = 1
        rows = torch.randperm(w.shape[0], generator=gen)
        cols = torch.randperm(w.shape[1], generator=gen)
        y = probe(x)
        tol = 1e-4 * float(y.abs().max())
        if depthwise:  # one permutation of channels: weight rows, bias and input together
            w.copy_(w.detach().index_select(0, rows))
            if getattr(probe, "bias", None) is not None:
                probe.bias.copy_(probe.bias.index_select(0, rows))
            return bool(torch.allclose(probe(x.index_select(1, rows)), y.index_select(1, rows), rtol=1e-4, atol=tol))
        dense_w = w.detach().clone()
        w.copy_(dense_w.index_select(0, rows))
        if getattr(probe, "bias", None) is not None:
            probe.bias.copy_(probe.bias.index_select(0, rows))
        rows_ok = torch.allclose(probe(x), y.index_select(axis, rows), rtol=1e-4, atol=1e-4 * float(y.abs().max()))
        w.copy_(dense_w.index_select(1, cols))
        if getattr(probe, "bias", None) is not None:
            probe.bias.copy_(probe.bias.index_select(0, torch.argsort(rows)))
        cols_ok = torch.allclose(
            probe(x.index_select(1 if axis == 1 else -1, cols)), y, rtol=1e-4, atol=1e-4 * float(y.abs().max())
        )
        return bool(rows_ok and cols_ok)
    except Exception:  # noqa: BLE001 - a forward this probe cannot drive: not a plain layer
        return False


def not_plain_reason(module: nn.Module) -> str | None:
    """Why a Linear/Conv1d/Conv2d (subclass) is not a plain layer (:func:`is_producer` refuses it), else None."""
    if not isinstance(module, _LAYERS) or _plain_layer(module):
        return None
    return (
        f"is a {type(module).__name__} whose output channels do not follow its weight rows and bias alone "
        "(its own forward or extra tensors such as a gain, checked on a random copy): folding would change it"
    )


def is_producer(module: nn.Module) -> bool:
    """A layer whose output channels are the rows of its weight: a plain Linear or ungrouped Conv1d/2d."""
    if not _plain_layer(module):
        return False
    return isinstance(module, nn.Linear) or module.groups == 1


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
    base = next((b for b in (*_ELEMENTWISE_MODULES, *_POOL_MODULES) if isinstance(module, b)), None)
    if base is not None and type(module).forward is not base.forward:
        return None, f"{type(module).__name__} overrides the forward of {base.__name__}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not _plain_layer(module):
        return None, f"{type(module).__name__} does not act per channel on a random copy (its own forward)"
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
