"""The distillation loop: frozen dense teacher → pruned student, masks exact after every step.

:func:`distill` trains ``student`` on (1−α)·CE_ε + α·τ²·KL to ``teacher`` with
AdamW/SGD, warmup + cosine, optional bf16 autocast and gradient clipping. The
masks (from the plan, the given :class:`MaskKeeper`, or the student's exact
zeros) are re-applied after every optimiser step, and the run ends by checking
that no masked weight came back. It runs as is under ``torchrun`` (DDP; the
teacher is not wrapped) and writes resumable checkpoints on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError, PlanMismatchError
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.select import MaskKeeper
from mp_plugin.planning.build import PrunePlan
from mp_plugin.progress import progress
from mp_plugin.recover.distill.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from mp_plugin.recover.distill.config import DistillConfig
from mp_plugin.recover.distill.data import model_num_classes
from mp_plugin.recover.distill.dist import DistContext
from mp_plugin.recover.distill.errors import DataMismatchError, DenseStudentError, NonFiniteLossError
from mp_plugin.recover.distill.loss import kd_loss
from mp_plugin.recover.distill.optim import build_optimizer, warmup_cosine

__all__ = ["distill", "evaluate", "DistillResult", "masks_from_plan", "Callback"]

Callback = Callable[[int, nn.Module, dict], Any]


@dataclass
class DistillResult:
    """What a distillation run did.

    Attributes:
        steps: optimiser steps taken in total (including those before a resume).
        history: one metrics dict per logged step (``step``, ``loss``, ``acc``, ``sparsity``, ``lr``).
        first_loss / last_loss: mean training loss over the first / last logging window (nats).
        sparsity_before: fraction of masked-out entries in the masked layers (from the masks).
        sparsity_after: fraction of exact zeros in those layers' weights after training (measured).
        val: validation metrics after training (``top1``, ``teacher_agreement``, ``loss``) or None.
        checkpoint: path of the last checkpoint written (rank 0), or None.
        plan: the plan the run used (from the argument or the resumed checkpoint).
        seconds: wall time of the training loop.
    """

    steps: int
    history: list[dict] = field(default_factory=list)
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0
    val: dict | None = None
    checkpoint: Path | None = None
    plan: PrunePlan | None = None
    seconds: float = 0.0


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


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"], batch.get("label")
    raise DataMismatchError(f"cannot read a batch of type {type(batch).__name__}: expected (images, labels)")


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _call_callback(cb: Any, step: int, model: nn.Module, metrics: dict) -> None:
    """Plain callables get (step, model, metrics); objects with ``.step(model, step)`` (CertificateCallback) too."""
    if callable(cb):
        cb(step, model, metrics)
        return
    method = getattr(cb, "step", None)
    if not callable(method):
        raise TypeError(f"callback {cb!r} is neither callable nor has a step(model, step) method")
    method(model, step)


def _check_classes(student: nn.Module, teacher: nn.Module | None, loader: Any, config: DistillConfig) -> None:
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
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # n, correct, loss·n, agree
    labelled = True
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _split_batch(batch)
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
    model.train(was_training)
    ctx.all_reduce_sum(sums)
    n = max(1.0, float(sums[0]))
    nan = float("nan")
    return {
        "n": int(sums[0]),
        "top1": float(sums[1]) / n if labelled else nan,
        "loss": float(sums[2]) / n if labelled else nan,
        "teacher_agreement": float(sums[3]) / n if teacher is not None else nan,
    }


def _measured_sparsity(keeper: MaskKeeper) -> float:
    """Fraction of exact zeros in the weights of the masked layers (measured, not read from the masks)."""
    total = sum(m.numel() for m in keeper.masks.values())
    zeros = sum(int((keeper._weight(name).detach() == 0).sum()) for name in keeper.masks)
    return zeros / total if total else 0.0


def _masked_nonzeros(keeper: MaskKeeper) -> int:
    return sum(int((keeper._weight(name).detach()[~mask] != 0).sum()) for name, mask in keeper.masks.items())


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader: Iterable,
    config: DistillConfig | None = None,
    val_loader: Iterable | None = None,
    plan: PrunePlan | None = None,
    keeper: MaskKeeper | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    dist: DistContext | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    log: Callable[[str], Any] | None = None,
) -> DistillResult:
    """Distil ``teacher`` into the pruned ``student`` with frozen masks.

    Args:
        student: the pruned model (trained in place; stays an ordinary module).
        teacher: the dense model (frozen: eval mode, no gradients), or None for
            plain label-smoothed fine-tuning (then ``config.alpha`` is treated as 0).
        train_loader: yields ``(images (B,3,H,W), labels (B,))`` or bare image tensors
            (labels optional when ``alpha == 1``). ``mp_plugin.integrations.timm.make_loaders`` builds one.
        config: :class:`DistillConfig` (default: the spec's α=0.5, τ=2, ε=0.1, 3 epochs).
        val_loader: evaluated once after training (top-1, teacher agreement).
        plan: the :class:`PrunePlan` that pruned ``student``; masks are read from its layers.
        keeper: a ready :class:`MaskKeeper` (overrides ``plan``'s masks).
        checkpoint_dir: rank 0 writes ``last.pt`` (+ ``plan.json``) here at the end and every
            ``config.checkpoint_every`` steps.
        resume: a checkpoint written by a previous run; its plan, masks and permutation
            must match this run's (else :class:`PlanMismatchError`).
        callbacks: called after every optimiser step with ``(step, model, metrics)``;
            objects with a ``step(model, step)`` method (``CertificateCallback``) are called that way.
        dist: a :class:`DistContext` (default: the initialised process group, if any).
        device: where to train (default: the student's device, or the context's).
        show_progress: tqdm bar on rank 0 with loss, accuracy and sparsity.
        log: called with one-line status messages on rank 0.

    Returns:
        :class:`DistillResult`.

    Raises:
        DenseStudentError: no masks and no plan, unless ``config.allow_dense``.
        DataMismatchError: model/data class counts or teacher/student logits differ.
        NonFiniteLossError: the loss became NaN/Inf (raised at that step).
        PlanMismatchError: the resume checkpoint belongs to a different plan/masks.
        MPPluginError: a masked weight is non-zero at the end (never expected).
    """
    cfg = config or DistillConfig()
    if teacher is None and cfg.alpha > 0:
        cfg = cfg.replace(alpha=0.0)
    dev = torch.device(device) if device is not None else None
    ctx = dist or DistContext.current(dev)
    if dev is None:
        dev = ctx.device or next(student.parameters()).device
    is_main = ctx.is_main
    say = (log or (lambda _m: None)) if is_main else (lambda _m: None)
    torch.manual_seed(cfg.seed)

    student.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()  # frozen: only ever run under torch.no_grad()

    if keeper is None:
        keeper = MaskKeeper(student, masks_from_plan(student, plan) if plan is not None else None)
    state = None
    if resume is not None:
        state = read_checkpoint(resume)
        plan = restore_checkpoint(state, student, keeper, plan)
        say(f"resumed from {resume} at step {state['step']}")
    if not keeper.masks and not cfg.allow_dense:
        raise DenseStudentError(
            "the student has no pruned weights and no plan was given: this would train a dense model. "
            "Prune it first (mp_plugin.apply) or pass DistillConfig(allow_dense=True)"
        )
    keeper.apply()
    sparsity_before = keeper.sparsity
    _check_classes(student, teacher, train_loader, cfg)

    student.train()
    if cfg.freeze_norm_stats:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    optimizer = build_optimizer(student, cfg)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise DataMismatchError("the training loader is empty")
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    scheduler = warmup_cosine(optimizer, total, cfg.warmup_steps, cfg.warmup_start_ratio, cfg.min_lr_ratio)
    step = 0
    if state is not None:
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    keeper.attach(optimizer)
    model = ctx.wrap(student)
    sampler = getattr(train_loader, "sampler", None)

    bar = progress(total=total, initial=step, desc="distill", unit="step", disable=not (show_progress and is_main))
    history: list[dict] = []
    window = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, n
    first_loss = float("nan")
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    written: Path | None = None
    t0 = time.perf_counter()
    try:
        while step < total:
            epoch = step // steps_per_epoch
            skip = step - epoch * steps_per_epoch
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            for i, batch in enumerate(train_loader):
                if i < skip:
                    continue
                if step >= total:
                    break
                x, y = _split_batch(batch)
                if y is None and cfg.alpha < 1:
                    raise DataMismatchError("batches carry no labels: use alpha=1 (pure distillation)")
                x = x.to(dev, non_blocking=True)
                y = None if y is None else y.to(dev, non_blocking=True)
                with _autocast(dev, cfg.bf16):
                    t_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(x)
                    s_logits = model(x)
                if t_logits is not None and t_logits.shape != s_logits.shape:
                    raise DataMismatchError(
                        f"teacher logits {tuple(t_logits.shape)} and student logits {tuple(s_logits.shape)} differ"
                    )
                if y is not None and cfg.alpha < 1 and int(y.max()) >= s_logits.shape[-1]:
                    raise DataMismatchError(
                        f"label {int(y.max())} is out of range for a model with {s_logits.shape[-1]} classes"
                    )
                loss = kd_loss(s_logits, t_logits, y, cfg.alpha, cfg.tau, cfg.label_smoothing)
                flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
                ctx.all_reduce_sum(flag)
                if float(flag) > 0:
                    raise NonFiniteLossError(
                        f"the loss is {float(loss.detach())} at step {step + 1} (epoch {epoch}); stopping. "
                        "Check the learning rate, the data (NaN/Inf pixels) and the model weights"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                optimizer.step()  # MaskKeeper re-zeroes pruned weights in its post-step hook
                scheduler.step()
                step += 1
                with torch.no_grad():
                    ref = y if y is not None else (t_logits.argmax(-1) if t_logits is not None else None)
                    correct = float((s_logits.argmax(-1) == ref).sum()) if ref is not None else float("nan")
                window += torch.tensor([float(loss.detach()) * x.shape[0], correct, x.shape[0]], dtype=torch.float64)
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(loss.detach()),
                    "lr": optimizer.param_groups[0]["lr"],
                    "sparsity": sparsity_before,
                }
                for cb in callbacks:
                    _call_callback(cb, step, student, metrics)
                if step % max(1, cfg.log_every) == 0 or step == total:
                    red = ctx.all_reduce_sum(window.clone())
                    n = max(1.0, float(red[2]))
                    record = {**metrics, "loss": float(red[0]) / n, "acc": float(red[1]) / n}
                    history.append(record)
                    if math.isnan(first_loss):
                        first_loss = record["loss"]
                    window.zero_()
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.3f}", sparsity=f"{sparsity_before:.4f}"
                    )
                bar.update(1)
                if ckpt_path is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and is_main:
                    written = save_checkpoint(
                        ckpt_path, student, keeper, plan, optimizer, scheduler, step, epoch, cfg.to_dict()
                    )
    finally:
        bar.close()
        keeper.detach()
    seconds = time.perf_counter() - t0

    ctx.broadcast_buffers(student)  # ranks end with identical BatchNorm statistics, not only parameters
    leaked = _masked_nonzeros(keeper)
    sparsity_after = _measured_sparsity(keeper)
    if leaked:
        raise MPPluginError(f"{leaked} masked weights are non-zero after distillation: masks were not kept")
    if ckpt_path is not None and is_main:
        written = save_checkpoint(
            ckpt_path, student, keeper, plan, optimizer, scheduler, step, step // steps_per_epoch, cfg.to_dict()
        )
    ctx.barrier()
    val = evaluate(student, val_loader, teacher, dev, ctx) if val_loader is not None else None
    if val is not None:
        say(f"val: top-1 {val['top1']:.4f}, teacher agreement {val['teacher_agreement']:.4f} on {val['n']} images")
    last_loss = history[-1]["loss"] if history else float("nan")
    return DistillResult(
        steps=step,
        history=history,
        first_loss=first_loss,
        last_loss=last_loss,
        sparsity_before=sparsity_before,
        sparsity_after=sparsity_after,
        val=val,
        checkpoint=written,
        plan=plan,
        seconds=seconds,
    )
