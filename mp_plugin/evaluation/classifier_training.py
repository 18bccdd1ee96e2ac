"""Supervised training of in-memory image classifiers on the one training loop.

Used to train the Fashion-MNIST zoo (:mod:`mp_plugin.evaluation.zoo`) and for the
training-time MP pruning runs (:mod:`mp_plugin.recover.training_mp`). Data are whole
tensors in memory (x: (N, …) float, y: (N,) int64), shuffled with a seeded
generator, so a run is reproducible for a fixed seed and thread count. The steps are
those of :func:`mp_plugin.recover.distill.distill` (the one loop), configured by
:func:`loop_config`: plain cross-entropy, weight decay on every parameter, step decay.

Hooks:

* ``penalty(model) -> scalar`` is added to the cross-entropy (e.g. L1+L2);
* ``on_epoch_end(model, epoch, optimizer)`` runs after each epoch (epochs count
  from 1), e.g. an :class:`~mp_plugin.recover.training_mp.MPSingularValuePruning` step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.calibration import eval_mode
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.recover.distill import DistillConfig, distill

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


class _ShuffledBatches:
    """Batches of in-memory (x, y), reshuffled on every pass with one seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for start in range(0, len(self.x), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


def loop_config(cfg: TrainConfig) -> DistillConfig:
    """The :class:`DistillConfig` of the one training loop that runs ``cfg``.

    Weight decay on every parameter (``decay_all``), the step schedule (×``lr_decay`` every
    ``lr_decay_every`` epochs), the global RNG left alone (shuffling has its own generator),
    no masks required.
    """
    if cfg.optimizer not in ("sgd", "adamw"):
        raise MPPluginError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd' or 'adamw'")
    return DistillConfig(
        alpha=0.0,
        label_smoothing=0.0,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,  # type: ignore[arg-type]
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        decay_all=True,
        schedule="step",
        lr_decay=cfg.lr_decay,
        lr_decay_every=cfg.lr_decay_every,
        seed=None,
        allow_dense=True,
        log_every=10**9,
    )


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

    Runs the one training loop (:func:`mp_plugin.recover.distill.distill`) with
    :func:`loop_config` and the loss CE(model(x), y) + penalty(model).

    Args:
        model: maps (B, …) inputs to (B, C) logits.
        x: (N, …) float inputs; y: (N,) int64 labels.
        cfg: optimiser, schedule and seed.
        penalty: optional regulariser added to the loss each step.
        on_epoch_end: optional hook; it may replace modules and update the optimizer's param groups.
        show_progress: tqdm bar over steps.

    Raises:
        MPPluginError: empty data, mismatched sizes, or a non-finite loss (stops at once).
    """
    if len(x) == 0 or len(x) != len(y):
        raise MPPluginError(f"need matching non-empty inputs and labels, got {len(x)} and {len(y)}")

    def loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        value = F.cross_entropy(net(batch[0]), batch[1])
        return value + penalty(model) if penalty is not None else value

    result = distill(
        model,
        None,
        _ShuffledBatches(x, y, cfg.batch_size, cfg.seed),
        loop_config(cfg),
        keeper=MaskKeeper(model, {}),  # dense training: no weight is held, exact zeros included
        loss=loss,
        epoch_end=[on_epoch_end] if on_epoch_end is not None else (),
        show_progress=show_progress,
    )
    model.eval()
    return [EpochLog(e["epoch"], e["loss"], e["seconds"], e["hook"]) for e in result.epochs]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on (x: (N, …), y: (N,))."""
    correct = 0
    with eval_mode(model):  # every submodule's train flag comes back
        for start in range(0, len(x), batch_size):
            correct += int((model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))
