"""Distillation settings: :class:`DistillConfig` and the per-family defaults of ALGORITHM.md §4."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from mp_plugin.errors import MPPluginError

__all__ = ["DistillConfig", "FAMILY_DEFAULTS"]

#: Recipe table of ALGORITHM.md §4 (CAST Stage 2): optimiser, lr, weight decay, batch, warmup steps.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.01, "batch_size": 32, "warmup_steps": 1000},
    "convnext": {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.01, "batch_size": 32, "warmup_steps": 1000},
    "resnet": {
        "optimizer": "sgd",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "batch_size": 256,
        "warmup_steps": 500,
        "momentum": 0.9,
    },
}


@dataclass
class DistillConfig:
    """Knowledge distillation from the frozen dense teacher to the pruned student.

    Loss: (1−α)·CE_ε(student, y) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)).

    Attributes:
        alpha: weight α of the KD term in [0, 1] (1 = pure distillation, labels unused).
        tau: temperature τ > 0.
        label_smoothing: ε of the cross-entropy term.
        epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (None = all epochs).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum ``momentum``, Nesterov off).
        lr: peak learning rate (after warmup).
        schedule: ``"cosine"`` (warmup, then cosine to ``lr · min_lr_ratio``), ``"step"``
            (lr × ``lr_decay`` after every ``lr_decay_every`` epochs) or ``"constant"``.
        min_lr_ratio: cosine decays to ``lr · min_lr_ratio``.
        warmup_steps: linear warmup from ``lr · warmup_start_ratio`` to ``lr``.
        warmup_start_ratio: where the warmup starts, as a fraction of ``lr``.
        lr_decay / lr_decay_every: the ``"step"`` schedule's factor and period (epochs).
        weight_decay: decoupled (AdamW) or L2 (SGD) decay; never on biases, norm
            weights, ``pos_embed``, ``cls_token`` or any 1-D parameter unless ``decay_all``.
        decay_all: weight decay on every trainable parameter (one parameter group).
        momentum: SGD momentum.
        batch_size: images per step *per process*.
        bf16: bf16 autocast for the forward passes (CUDA, or CPU where supported).
        grad_clip: clip the global gradient norm to this (None = off).
        log_every: refresh the progress bar / log every this many steps.
        seed: seed of torch's RNG (data order, augmentation) for this run; None leaves the RNG as it is.
        num_workers: DataLoader worker processes.
        allow_dense: allow a student without masks (otherwise refused: no run
            silently trains a dense model).
        checkpoint_every: save a checkpoint every this many steps (and at the end).
        freeze_norm_stats: keep BatchNorm layers in eval mode while training (running
            statistics frozen; useful for small batches or data unlike the pre-training data).
        eval_mode: train with the whole model in eval mode (dropout off, BatchNorm frozen);
            its train/eval mode is restored afterwards.
    """

    alpha: float = 0.5
    tau: float = 2.0
    label_smoothing: float = 0.1
    epochs: int = 3
    max_steps: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.0
    lr_decay: float = 1.0
    lr_decay_every: int = 1
    weight_decay: float = 0.05
    decay_all: bool = False
    momentum: float = 0.9
    batch_size: int = 32
    bf16: bool = False
    grad_clip: float | None = None
    log_every: int = 10
    seed: int | None = 0
    num_workers: int = 0
    allow_dense: bool = False
    checkpoint_every: int = 0
    freeze_norm_stats: bool = False
    eval_mode: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise MPPluginError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0 < self.tau < math.inf:  # NaN fails too
            raise MPPluginError(f"tau must be positive, got {self.tau}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MPPluginError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.optimizer not in ("adamw", "sgd"):
            raise MPPluginError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise MPPluginError("epochs and batch_size must be ≥ 1")
        if self.schedule not in ("cosine", "step", "constant"):
            raise MPPluginError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if not 0 < self.lr_decay < math.inf or self.lr_decay_every < 1:
            raise MPPluginError("lr_decay must be positive and lr_decay_every ≥ 1")
        if not 0 < self.lr < math.inf:
            raise MPPluginError(f"lr must be positive, got {self.lr}")
        checks = (
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "None or ≥ 1"),
            (
                "grad_clip",
                self.grad_clip is None or 0 < self.grad_clip < math.inf,
                "None or > 0 (a negative norm flips the step)",
            ),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "≥ 0 and finite"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, "≥ 0"),
            ("warmup_start_ratio", 0 <= self.warmup_start_ratio <= 1, "in [0, 1]"),
            ("log_every", self.log_every >= 1, "≥ 1"),
            ("num_workers", self.num_workers >= 0, "≥ 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "≥ 0 (0: only at the end)"),
        )
        for name, ok, need in checks:
            if not ok:
                raise MPPluginError(f"{name} must be {need}, got {getattr(self, name)!r}")

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> DistillConfig:
        """The spec's recipe for ``"vit"``, ``"convnext"`` or ``"resnet"``, with ``overrides`` applied."""
        key = family.lower()
        if key not in FAMILY_DEFAULTS:
            raise MPPluginError(f"unknown family {family!r}; known: {sorted(FAMILY_DEFAULTS)}")
        return cls(**{**FAMILY_DEFAULTS[key], **overrides})

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)
