"""Hybrid Magnitude–SER (ALGORITHM.md §2 item 6): the protocol of the paper's Tables 1–2.

Along a cumulative schedule of sparsities, exact global magnitude (:func:`magnitude_step`,
plus a short frozen-mask fine-tune) up to ``magnitude_until`` (0.20), then SER steps
(:class:`~mp_plugin.recover.ser.reallocation.SpectralEdgeReallocation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection, find_target_layers
from mp_plugin.masks.counts import check_sparsity, global_prune_counts
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.masks.select import unstructured_mask
from mp_plugin.planning.plan import PlanConfig
from mp_plugin.recover.distill import DistillConfig, distill, evaluate
from mp_plugin.recover.ser.reallocation import SERConfig, SpectralEdgeReallocation

__all__ = ["DEFAULT_SCHEDULE", "HybridConfig", "HybridResult", "hybrid_magnitude_ser", "magnitude_step"]

DEFAULT_SCHEDULE: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 15))  # 0.05 … 0.70


def _hybrid_finetune_default() -> DistillConfig:
    # spec (run_finetune_magnitude): SGD 0.9, lr 3e−5, wd 1e−6, ε 0.1, clip 1.0, warmup from 1 % to cosine 1 %
    return DistillConfig(
        epochs=1,
        optimizer="sgd",
        lr=3e-5,
        weight_decay=1e-6,
        grad_clip=1.0,
        warmup_start_ratio=0.01,
        min_lr_ratio=0.01,
    )


@dataclass
class HybridConfig:
    """Settings of :func:`hybrid_magnitude_ser`.

    Attributes:
        schedule: increasing sparsities visited in order (default 0.05, 0.10, …, 0.70).
        magnitude_until: steps with s ≤ this use exact global magnitude (spec: 0.20); later steps SER.
        finetune: the short fine-tune after each magnitude step (None = none).
        ser: :class:`SERConfig` of the SER steps (its ``finetune`` runs after each SER step).
        selection: layer selection of every step (default: ``ser.plan_config``'s or the core default); when
            given it replaces ``ser.plan_config``'s selection, so masks stay cumulative over one layer set.
        show_progress: tqdm bars.
    """

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    magnitude_until: float = 0.20
    finetune: DistillConfig | None = field(default_factory=_hybrid_finetune_default)
    ser: SERConfig = field(default_factory=SERConfig)
    selection: LayerSelection | None = None
    show_progress: bool = False

    def __post_init__(self) -> None:
        sched = [check_sparsity(s) for s in self.schedule]
        if not sched or any(b <= a for a, b in zip(sched, sched[1:])):
            raise MPPluginError(f"schedule must be a non-empty increasing sequence, got {self.schedule}")


@dataclass
class HybridResult:
    """History of a Hybrid run: one dict per schedule step (``sparsity``, ``method``, ``achieved``, metrics).

    Attributes:
        steps: the per-step records.
        masks: the final masks (``True`` = kept) of the target layers.
    """

    steps: list[dict] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def magnitude_step(
    model: nn.Module, sparsity: float, selection: LayerSelection | None = None, previous: dict | None = None
) -> dict[str, torch.Tensor]:
    """Exact global magnitude to ``sparsity`` over the target layers, cumulative with ``previous`` masks.

    Zeros have the smallest magnitude, so earlier pruned entries are selected first;
    the result is additionally AND-ed with ``previous`` so that zeros stay zero.
    """
    targets, _ = find_target_layers(model, selection)
    if not targets:
        raise MPPluginError("the model has no target layer to prune")
    weights = [t.weight for t in targets]
    counts = global_prune_counts(weights, [1.0] * len(weights), sparsity)
    masks = {}
    for t, c in zip(targets, counts):
        m = unstructured_mask(t.weight, c)
        if previous is not None and t.name in previous:
            m = m & previous[t.name].to(m.device)
        t.weight.masked_fill_(~m, 0)
        masks[t.name] = m
    return masks


def hybrid_magnitude_ser(
    model: nn.Module,
    train_loader: Iterable,
    teacher: nn.Module | None = None,
    config: HybridConfig | None = None,
    val_loader: Iterable | None = None,
    device: torch.device | str | None = None,
    on_step: Callable[[dict, nn.Module], Any] | None = None,
) -> HybridResult:
    """The Hybrid Magnitude–SER protocol: magnitude steps up to ``magnitude_until``, then SER steps.

    Args:
        model: the dense (or lightly pruned) model; pruned in place.
        train_loader: fine-tuning/selection batches ``(images, labels)``.
        teacher: the dense model for KD (and as SER's selection reference); None = CE only.
        config: :class:`HybridConfig`.
        val_loader: if given, evaluated after every step (``top1``, ``teacher_agreement``).
        device: where to train.
        on_step: called with ``(record, model)`` after every step (e.g. to save a checkpoint).

    Returns:
        :class:`HybridResult`; the final sparsity over the target layers is exactly the last
        schedule entry (up to rounding of one count).
    """
    cfg = config or HybridConfig()
    selection = cfg.selection or (cfg.ser.plan_config.selection if cfg.ser.plan_config else None)
    ser_cfg = cfg.ser
    if cfg.selection is not None:  # one layer set for every step: SER plans over the magnitude steps' layers
        base = cfg.ser.plan_config or PlanConfig()
        ser_cfg = replace(cfg.ser, plan_config=PlanConfig(**{**base.__dict__, "selection": cfg.selection}))
    ser = SpectralEdgeReallocation(ser_cfg)
    masks: dict[str, torch.Tensor] | None = None
    result = HybridResult()
    for s in cfg.schedule:
        record: dict[str, Any] = {"sparsity": float(s)}
        if s <= cfg.magnitude_until + 1e-12:
            masks = magnitude_step(model, s, selection, masks)
            record["method"] = "magnitude"
            if cfg.finetune is not None:
                ft = distill(
                    model,
                    teacher,
                    train_loader,
                    cfg.finetune,
                    keeper=MaskKeeper(model, masks),
                    device=device,
                    show_progress=cfg.show_progress,
                )
                record["finetune_loss"] = [ft.first_loss, ft.last_loss]
                record["finetune_steps"] = ft.steps
        else:
            res = ser.run(model, s, train_loader, teacher, device)
            masks = res.masks
            record["method"] = "ser"
            record["ser"] = res.summary()
            if res.finetune is not None:
                record["finetune_loss"] = [res.finetune.first_loss, res.finetune.last_loss]
                record["finetune_steps"] = res.finetune.steps
        total = sum(m.numel() for m in masks.values())
        record["achieved"] = sum(int((~m).sum()) for m in masks.values()) / total
        if val_loader is not None:
            record["val"] = evaluate(model, val_loader, teacher, device)
        result.steps.append(record)
        if on_step is not None:
            on_step(record, model)
    result.masks = masks or {}
    return result
