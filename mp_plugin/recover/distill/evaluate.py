"""Reading batches, checking them against the model, evaluating, and the plan's masks.

* :func:`split_batch` — (images, labels) of a batch in any of the usual layouts.
* :func:`check_classes` — the model, teacher and data agree on the class count.
* :func:`evaluate` — top-1, cross-entropy and teacher agreement (DDP-reduced).
* :func:`masks_from_plan` — the masks a plan's applied layers carry (read from exact zeros).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import PlanMismatchError
from mp_plugin.layers.calibration import eval_mode
from mp_plugin.layers.patterns import Pattern
from mp_plugin.planning.build import PrunePlan
from mp_plugin.recover.distill.config import DistillConfig
from mp_plugin.recover.distill.data import model_num_classes
from mp_plugin.recover.distill.dist import DistContext
from mp_plugin.recover.distill.errors import DataMismatchError

__all__ = ["split_batch", "check_classes", "evaluate", "masks_from_plan"]


def masks_from_plan(model: nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Masks (``True`` = kept) of the plan's pruned layers, read from the model's exact zeros.

    Raises:
        PlanMismatchError: the model lacks a plan layer, or a layer has fewer zeros than
            the plan prescribes (the plan was not applied: run ``mp_plugin.apply`` first).
    """
    modules = plan.check_model(model)
    masks: dict[str, torch.Tensor] = {}
    for lp in plan.layers:
        pat = Pattern.parse(lp.pattern)
        if pat.kind == "dense":
            continue
        weight = modules[lp.name].weight.detach()
        need = int(lp.n_prune) if pat.kind == "unstructured" else int(round(float(pat.sparsity) * weight.numel()))
        zeros = int((weight == 0).sum())
        if zeros < need:
            raise PlanMismatchError(
                f"layer {lp.name!r} has {zeros} zeros but the plan prunes {need}: apply the plan before distilling"
            )
        if need:
            masks[lp.name] = weight != 0
    return masks


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) of a batch: a tensor, an (x, y, …) tuple/list, or a dict with ``image``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"], batch.get("label")
    raise DataMismatchError(f"cannot read a batch of type {type(batch).__name__}: expected (images, labels)")


def check_classes(student: nn.Module, teacher: nn.Module | None, loader: Any, config: DistillConfig) -> None:
    """Raise :class:`DataMismatchError` when the model, the teacher and the data disagree on the class count."""
    n_model = model_num_classes(student)
    n_data = getattr(loader, "num_classes", None)
    if n_data is None:
        n_data = getattr(getattr(loader, "dataset", None), "num_classes", None)
    if config.alpha < 1 and n_model is not None and n_data is not None and n_model != n_data:
        raise DataMismatchError(
            f"the model has {n_model} output classes but the data has {n_data} class folders; "
            "give a model with a matching head (e.g. --num-classes) or use alpha=1 (pure distillation)"
        )
    if teacher is not None:
        n_teacher = model_num_classes(teacher)
        if n_model is not None and n_teacher is not None and n_model != n_teacher:
            raise DataMismatchError(f"student has {n_model} classes but teacher has {n_teacher}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    teacher: nn.Module | None = None,
    device: torch.device | str | None = None,
    dist: DistContext | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy, cross-entropy and (with a teacher) top-1 agreement with it, in eval mode.

    Returns:
        ``{"top1", "loss", "teacher_agreement", "n"}``; top1/loss are NaN when batches
        carry no labels, agreement NaN without a teacher. Sums are reduced over DDP ranks.
    """
    ctx = dist or DistContext()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model):
        sums = torch.zeros(4, dtype=torch.float64)  # n, correct, loss·n, agree
        labelled = True
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            x = x.to(dev)
            logits = model(x).float()
            sums[0] += x.shape[0]
            if y is not None:
                y = y.to(dev)
                sums[1] += float((logits.argmax(-1) == y).sum())
                sums[2] += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            else:
                labelled = False
            if teacher is not None:
                sums[3] += float((teacher(x).float().argmax(-1) == logits.argmax(-1)).sum())
    ctx.all_reduce_sum(sums)
    n = max(1.0, float(sums[0]))
    nan = float("nan")
    return {
        "n": int(sums[0]),
        "top1": float(sums[1]) / n if labelled else nan,
        "loss": float(sums[2]) / n if labelled else nan,
        "teacher_agreement": float(sums[3]) / n if teacher is not None else nan,
    }
