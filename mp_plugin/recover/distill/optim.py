"""Optimiser pieces: parameter groups without decay on 1-D/norm/position tensors, warmup + cosine LR."""

from __future__ import annotations

import math

import torch
from torch import nn

from mp_plugin.recover.distill.config import DistillConfig

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "warmup_cosine", "step_decay", "NO_DECAY_NAMES"]

#: Parameter-name fragments that never take weight decay (besides every tensor with ndim ≤ 1).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "relative_position_bias_table")

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim <= 1 or is_norm or p_name == "bias" or any(k in full for k in NO_DECAY_NAMES):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of trainable parameters: ``{"params", "weight_decay", "names"}``.

    Biases, normalisation weights, ``pos_embed``/``cls_token`` (and similar
    tokens) and every 1-D parameter go into the ``weight_decay=0`` group.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    skip = _no_decay_names(model)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in skip:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum) over :func:`param_groups` of ``model`` (one group when ``config.decay_all``)."""
    if config.decay_all:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}]
    else:
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, config.weight_decay)]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameter")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    start_ratio: float = 0.0,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``start_ratio``·lr to lr over ``warmup_steps``, then cosine to ``min_ratio``·lr.

    The multiplier at step t (0-based, before the t-th optimiser step) is
    ``start + (1−start)·t/warmup`` during warmup and
    ``min + (1−min)·½(1 + cos(π·(t−warmup)/(total−warmup)))`` after it.
    """
    total = max(1, int(total_steps))
    warm = max(0, min(int(warmup_steps), total - 1))

    def factor(step: int) -> float:
        if step < warm:
            return start_ratio + (1.0 - start_ratio) * step / warm
        span = max(1, total - warm)
        progress = min(1.0, (step - warm) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_decay(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, decay: float, every: int = 1
) -> torch.optim.lr_scheduler.MultiplicativeLR:
    """lr × ``decay`` after every ``every``-th epoch of ``steps_per_epoch`` optimiser steps (×1 otherwise)."""
    spe = max(1, int(steps_per_epoch))

    def factor(step: int) -> float:  # step = scheduler steps taken so far (≥ 1)
        return decay if step % spe == 0 and (step // spe) % every == 0 else 1.0

    return torch.optim.lr_scheduler.MultiplicativeLR(optimizer, factor)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: DistillConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``config.schedule`` names, stepped once per optimiser step."""
    if config.schedule == "step":
        return step_decay(optimizer, steps_per_epoch, config.lr_decay, config.lr_decay_every)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    return warmup_cosine(optimizer, total_steps, config.warmup_steps, config.warmup_start_ratio, config.min_lr_ratio)
