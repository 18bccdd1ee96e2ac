"""L_s: the ℓ∞→ℓ∞ Lipschitz constant of ψ₂, the network downstream of a pruned layer.

* :func:`sequential_bound` — rigorous: a product of induced ∞-norms (max row
  abs sum) along ``nn.Sequential`` chains of Linear/Conv layers and
  coordinatewise Lipschitz activations; eval-mode BatchNorm is folded into the
  row sums of the linear map before it. Anything else raises ``NotCertifiable``.
* :func:`jacobian_estimate` — local, heuristic: max_k Σ_j |∂z_k/∂y_j| at the
  layer outputs y_θ = A_θψ₁(s), θ ∈ {0, ½, 1}, from batched vector-Jacobian products.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mp_plugin.certificate.perturbation import in_side_pass
from mp_plugin.certificate.rigor import hook_problem, own_forward_problem
from mp_plugin.errors import NotCertifiable

__all__ = ["sequential_bound", "jacobian_estimate", "THETAS"]

THETAS = (0.0, 0.5, 1.0)

# coordinatewise activations and shape ops with their ∞→∞ Lipschitz constants
_ONE_LIPSCHITZ = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Tanh,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
_REFUSED = {
    nn.LayerNorm: "LayerNorm (normalises by a data-dependent scale, not globally Lipschitz-bounded here)",
    nn.GroupNorm: "GroupNorm (data-dependent normalisation)",
    nn.MultiheadAttention: "attention (softmax of products of activations)",
    nn.Softmax: "softmax inside ψ₂ (the certificate needs logits)",
    nn.LogSoftmax: "log-softmax inside ψ₂ (the certificate needs logits)",
}


def _row_sums(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().double()
    return w.abs().flatten(1).sum(1)  # conv: per output channel over its group's C_in·kh·kw


def _bn_scale(module: nn.Module, name: str, training: bool) -> torch.Tensor:
    if training:
        raise NotCertifiable(f"BatchNorm at '{name}' is in train mode (batch statistics): call model.eval() first")
    if module.running_var is None:
        raise NotCertifiable(f"BatchNorm at '{name}' has no running statistics (track_running_stats=False)")
    var = module.running_var.detach()
    if bool((var < 0).any()) or not bool(torch.isfinite(var).all()):
        raise NotCertifiable(f"BatchNorm at '{name}' has a negative or non-finite running_var")
    scale = 1.0 / torch.sqrt(var.double() + module.eps)
    own = 1.0 / torch.sqrt(var + module.eps)  # the scale the forward applies, rounded in the module's dtype
    scale = torch.maximum(scale, own.double()) * (1 + 4 * torch.finfo(var.dtype).eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return scale


def _path(model: nn.Module, layer_name: str) -> list[tuple[nn.Sequential, int, str]]:
    """(container, index of the child on the path, container's name) from the root down to the layer."""
    if layer_name == "":
        return []
    parts = layer_name.split(".")
    path = []
    node, prefix = model, ""
    for part in parts:
        if not isinstance(node, nn.Sequential) or type(node).forward is not nn.Sequential.forward:
            where = f"'{prefix}'" if prefix else "the model root"
            raise NotCertifiable(
                f"bound mode needs nn.Sequential chains from the pruned layer to the logits; {type(node).__name__} "
                f"at {where} has its own forward (residuals, attention or custom code cannot be bounded)"
            )
        keys = list(node._modules.keys())
        path.append((node, keys.index(part), prefix))
        node = node._modules[part]
        prefix = f"{prefix}.{part}" if prefix else part
    return path


@contextlib.contextmanager
def batchnorm_input_ndim(model: nn.Module) -> Iterator[dict[str, int]]:
    """Inside the block, record {BatchNorm1d name: number of dimensions of its input} of the forwards that run."""
    seen: dict[str, int] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left as it is
            seen.setdefault(name, int(args[0].dim()))

        return hook

    handles = [
        m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def sequential_bound(
    model: nn.Module,
    layer_name: str,
    training: Callable[[str], bool] | None = None,
    bn_input_ndim: dict[str, int] | None = None,
) -> tuple[float, list[str]]:
    """Rigorous upper bound on the ℓ∞→ℓ∞ Lipschitz constant of everything after ``layer_name``.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials allowed) in eval mode.
        layer_name: qualified name of the pruned layer.
        training: name → whether that module is in train mode (default: the module's own flag).
        bn_input_ndim: {BatchNorm1d name: its input's number of dimensions}
            (:func:`batchnorm_input_ndim`). A BatchNorm1d right after a Linear is folded into
            the Linear's row sums only when its input is 2-D (B, C): on (B, C, L) it scales
            axis 1 while the Linear's rows index the last axis. Unknown: not folded (still a
            bound, a looser one).

    Returns:
        (L, ops): the bound (dimensionless, logit units per unit of layer output) and a
        description of each downstream op with its factor.

    Raises:
        NotCertifiable: naming the first op it cannot bound, a forward hook or overridden
            forward anywhere in ``model``, or a pruned layer whose class overrides its forward.
    """
    is_training = training or (lambda name: dict(model.named_modules())[name].training)
    why = hook_problem(model) or own_forward_problem(model.get_submodule(layer_name), layer_name)
    if why is not None:
        raise NotCertifiable(f"bound mode cannot prove a bound here: {why}")
    downstream: list[tuple[str, nn.Module]] = []
    for container, index, prefix in reversed(_path(model, layer_name)):
        for key in list(container._modules.keys())[index + 1 :]:
            downstream.append((f"{prefix}.{key}" if prefix else key, container._modules[key]))
    bound = 1.0
    pending: torch.Tensor | None = None  # row sums of the current linear map (BN folds in)
    pending_conv = False  # BatchNorm's channels are a conv's output channels (axis 1); a Linear's are its last axis
    ops: list[str] = []

    def flush() -> None:
        nonlocal pending, bound
        if pending is not None:
            bound *= float(pending.max()) if pending.numel() else 0.0
            pending = None

    def visit(name: str, m: nn.Module) -> None:
        nonlocal pending, bound, pending_conv
        kind = type(m)
        if kind is nn.Sequential:
            for key, child in m._modules.items():
                visit(f"{name}.{key}", child)
            return
        if kind in (nn.Linear, nn.Conv1d, nn.Conv2d):
            flush()
            pending, pending_conv = _row_sums(m), kind is not nn.Linear
            ops.append(f"{name}: {kind.__name__} ‖W‖∞={float(pending.max()):.4g}")
            return
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            scale = _bn_scale(m, name, is_training(name))
            # folding scales row i by channel i: right after a conv (both on axis 1); after a Linear the
            # BatchNorm's channel axis may not be the Linear's output axis ((B, C, L) input), so it is not folded
            foldable = pending_conv or (bn_input_ndim or {}).get(name) == 2
            if pending is not None and foldable and pending.shape == scale.shape:
                pending = pending * scale
                ops.append(f"{name}: BatchNorm (eval) folded into the row sums, max|γ/σ|={float(scale.max()):.4g}")
            else:
                flush()
                bound *= float(scale.max())
                ops.append(f"{name}: BatchNorm (eval) max|γ/σ|={float(scale.max()):.4g}")
            return
        if kind is nn.Dropout:
            if is_training(name):
                raise NotCertifiable(f"Dropout at '{name}' is in train mode: call model.eval() first")
            ops.append(f"{name}: Dropout (eval) 1")
            return
        for refused, why in _REFUSED.items():
            if isinstance(m, refused):
                raise NotCertifiable(f"cannot bound {type(m).__name__} at '{name}': {why}")
        if kind is nn.LeakyReLU:
            flush()
            factor = max(1.0, abs(float(m.negative_slope)))
            bound *= factor
            ops.append(f"{name}: LeakyReLU {factor:.4g}")
            return
        if kind is nn.Sigmoid:
            flush()
            bound *= 0.25
            ops.append(f"{name}: Sigmoid 0.25")
            return
        if kind in _ONE_LIPSCHITZ:
            flush()
            ops.append(f"{name}: {kind.__name__} 1")
            return
        if kind in (nn.AvgPool1d, nn.AvgPool2d):
            flush()  # an average is 1-Lipschitz; divisor_override d makes it sum/d over the kernel's k cells: k/d
            divisor = getattr(m, "divisor_override", None)
            size = (
                m.kernel_size
                if isinstance(m.kernel_size, tuple)
                else (m.kernel_size,) * (2 if kind is nn.AvgPool2d else 1)
            )
            factor = 1.0 if not divisor else math.prod(size) / abs(float(divisor))  # a negative d flips the sign
            bound *= factor
            ops.append(f"{name}: {kind.__name__} {factor:.4g}")
            return
        raise NotCertifiable(
            f"cannot bound {type(m).__name__} at '{name}': bound mode knows Linear/Conv, 1-Lipschitz coordinatewise "
            "activations, pooling, Dropout and eval-mode BatchNorm only"
        )

    for name, m in downstream:
        visit(name, m)
    flush()
    return bound, ops


def jacobian_estimate(
    model: nn.Module,
    layer: nn.Module,
    run: Callable[[], torch.Tensor],
    outputs_at: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    thetas: tuple[float, ...] = THETAS,
    chunk: int = 256,
) -> torch.Tensor:
    """Local ℓ∞ Lipschitz estimate L_s = max_θ max_k Σ_j |∂z_k/∂y_j| at y = y_θ(s). Not a bound.

    Args:
        model: the network (its parameters are not differentiated).
        layer: the pruned module; its output is replaced by y_θ during each pass.
        run: runs ``model`` on the batch and returns (B, K) logits.
        outputs_at: (input ψ₁, dense output, θ) → y_θ = A_θψ₁, same shape as the output.
        thetas: points on the segment; θ=1 is the dense layer, θ=0 the pruned one.
        chunk: logits differentiated per batched backward pass.

    Returns:
        (B,) float64 estimates.
    """
    best: torch.Tensor | None = None
    for theta in thetas:
        holder: dict[str, torch.Tensor] = {}

        def hook(
            module: nn.Module, inputs: tuple, output: torch.Tensor, theta: float = theta, holder: dict = holder
        ) -> torch.Tensor:
            if in_side_pass():
                return None
            y = outputs_at(inputs[0].detach(), output.detach(), theta).detach().requires_grad_(True)
            holder["y"] = y
            return y

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                z = run()
                y = holder["y"]
                rows = _jacobian_row_sums(z, y, chunk)
        finally:
            handle.remove()
        best = rows if best is None else torch.maximum(best, rows)
    assert best is not None
    return best


def _jacobian_row_sums(z: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """max_k Σ_j |∂z_{s,k}/∂y_{s,j}| per sample s (samples do not interact in eval mode)."""
    n, k = z.shape
    best = torch.zeros(n, dtype=torch.float64, device=z.device)
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    for start in range(0, k, chunk):
        ks = range(start, min(k, start + chunk))
        grad_out = eye[list(ks)].unsqueeze(1).expand(len(ks), n, k)
        try:
            (g,) = torch.autograd.grad(z, y, grad_outputs=grad_out, is_grads_batched=True, retain_graph=True)
        except RuntimeError:  # an op without a batching rule: one backward per logit
            g = torch.stack(
                [torch.autograd.grad(z, y, grad_outputs=grad_out[i], retain_graph=True)[0] for i in range(len(ks))]
            )
        sums = g.detach().double().abs().flatten(2).sum(2)  # (chunk, B)
        best = torch.maximum(best, sums.amax(0))
    return best
