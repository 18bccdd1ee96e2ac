"""A small, deterministic supervised training loop for in-memory image classifiers.

Used to train the Fashion-MNIST zoo (:mod:`mp_plugin.evaluation.zoo`) and for the
training-time MP pruning runs (:mod:`mp_plugin.recover.training_mp`). Data are whole
tensors in memory (x: (N, …) float, y: (N,) int64), shuffled with a seeded
generator, so a run is reproducible for a fixed seed and thread count.

Hooks:

* ``penalty(model) -> scalar`` is added to the cross-entropy (e.g. L1+L2);
* ``on_epoch_end(model, epoch, optimizer)`` runs after each epoch (epochs count
  from 1), e.g. an :class:`~mp_plugin.recover.training_mp.MPSingularValuePruning` step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.progress import progress

__all__ = ["EpochLog", "TrainConfig", "accuracy", "train_classifier"]


@dataclass
class TrainConfig:
    """Optimiser and schedule of :func:`train_classifier`.

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per step.
        optimizer: ``"sgd"`` (momentum) or ``"adamw"``.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: decoupled (AdamW) or coupled (SGD) weight decay.
        lr_decay: multiply lr by this factor every ``lr_decay_every`` epochs (1.0: constant).
        lr_decay_every: epochs between decays (the paper: ×0.96 every 4 epochs).
        seed: seeds initialisation-independent randomness (shuffling).
    """

    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    lr_decay_every: int = 1
    seed: int = 0


@dataclass
class EpochLog:
    """Per-epoch record: mean training loss (nats, CE + penalty), seconds, and hook output."""

    epoch: int
    loss: float
    seconds: float
    hook: object = field(default=None, repr=False)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD(momentum) or AdamW over ``model.parameters()`` as ``cfg`` says."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise MPPluginError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd' or 'adamw'")


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    on_epoch_end: Callable[[nn.Module, int, torch.optim.Optimizer], object] | None = None,
    show_progress: bool = False,
) -> list[EpochLog]:
    """Train ``model`` with cross-entropy on (x, y) in place; return one :class:`EpochLog` per epoch.

    Args:
        model: maps (B, …) inputs to (B, C) logits.
        x: (N, …) float inputs; y: (N,) int64 labels.
        cfg: optimiser, schedule and seed.
        penalty: optional regulariser added to the loss each step.
        on_epoch_end: optional hook; it may replace modules and update the optimizer's param groups.
        show_progress: tqdm bar over epochs.

    Raises:
        MPPluginError: empty data, mismatched sizes, or a non-finite loss (stops at once).
    """
    if len(x) == 0 or len(x) != len(y):
        raise MPPluginError(f"need matching non-empty inputs and labels, got {len(x)} and {len(y)}")
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    logs: list[EpochLog] = []
    bar = progress(range(1, cfg.epochs + 1), disable=not show_progress, desc="train", unit="epoch")
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            if not torch.isfinite(loss):
                raise MPPluginError(f"non-finite loss {loss.item()} at epoch {epoch}: lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        hook = on_epoch_end(model, epoch, opt) if on_epoch_end is not None else None
        if cfg.lr_decay != 1.0 and epoch % cfg.lr_decay_every == 0:
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_decay
        logs.append(EpochLog(epoch, total / seen, time.perf_counter() - t0, hook))
        bar.set_postfix(loss=f"{total / seen:.4f}")
    model.eval()
    return logs


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on (x: (N, …), y: (N,))."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int((model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(x))
