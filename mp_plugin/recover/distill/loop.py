"""The one training loop: distillation, fine-tuning, gated phases and data-free steps, masks kept.

:func:`distill` trains ``student`` in place. By default the loss is the recipe's
(1−α)·CE_ε + α·τ²·KL to ``teacher`` (``loss="kd"``); ``loss="ce"`` is plain cross-entropy
and any callable ``loss(model, batch) -> scalar`` replaces both (SER selection, the
classifier trainer, the MP shrink step, the fine-tuning benchmark use their own). The
optimiser (AdamW/SGD) and schedule (warmup + cosine, step decay, constant) come from
:class:`DistillConfig`; optional bf16 autocast and gradient clipping. A
:class:`~mp_plugin.masks.keep.MaskKeeper` (from the plan, the one given, or the
student's exact zeros) puts held weights back after every optimiser step, and the run
ends by checking that none moved. Hooks: ``before_step`` (after backward, before the
optimiser step: e.g. gradient scaling), ``callbacks`` (after every step) and
``epoch_end`` (after every full epoch: e.g. an MP singular-value step). It runs as is
under ``torchrun`` (DDP; the teacher is not wrapped) and writes resumable checkpoints on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.planning.build import PrunePlan
from mp_plugin.progress import progress
from mp_plugin.recover.distill.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from mp_plugin.recover.distill.config import DistillConfig
from mp_plugin.recover.distill.dist import DistContext
from mp_plugin.recover.distill.errors import DataMismatchError, DenseStudentError, NonFiniteLossError
from mp_plugin.recover.distill.evaluate import check_classes, evaluate, masks_from_plan, split_batch
from mp_plugin.recover.distill.loss import kd_loss
from mp_plugin.recover.distill.optim import build_optimizer, build_scheduler

__all__ = ["distill", "evaluate", "DistillResult", "masks_from_plan", "Callback", "LossFn", "EpochHook", "StepHook"]

Callback = Callable[[int, nn.Module, dict], Any]
#: ``loss(model, batch) -> scalar tensor``; ``model`` is the (DDP-wrapped) student, ``batch`` as the loader yields it.
LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: ``hook(model, epoch, optimizer) -> anything``, after every full epoch (epochs count from 1).
EpochHook = Callable[[nn.Module, int, torch.optim.Optimizer], Any]
#: ``hook(step, model)`` after ``backward()`` and gradient clipping, before ``optimizer.step()`` (step from 1).
StepHook = Callable[[int, nn.Module], Any]


@dataclass
class DistillResult:
    """What a training run did.

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
        epochs: one dict per full epoch of this run: ``epoch`` (from 1), ``loss`` (mean per
            example, nats), ``seconds`` and ``hook`` (what the last ``epoch_end`` hook returned).
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
    epochs: list[dict] = field(default_factory=list)


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


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (also inside tuples, lists and dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    """Examples in ``batch``: the leading size of its first tensor (1 for a batch without tensors)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    return 1


def _kd_forward(
    model: nn.Module, teacher: nn.Module | None, batch: Any, cfg: DistillConfig, dev: torch.device, plain_ce: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, student logits, teacher logits, labels) of the built-in KD / CE losses."""
    x, y = split_batch(batch)
    if y is None and (plain_ce or cfg.alpha < 1):
        raise DataMismatchError("batches carry no labels: use alpha=1 (pure distillation)")
    with _autocast(dev, cfg.bf16):
        t_logits = None
        if teacher is not None and not plain_ce:
            with torch.no_grad():
                t_logits = teacher(x)
        s_logits = model(x)
    if t_logits is not None and t_logits.shape != s_logits.shape:
        raise DataMismatchError(
            f"teacher logits {tuple(t_logits.shape)} and student logits {tuple(s_logits.shape)} differ"
        )
    if y is not None and (plain_ce or cfg.alpha < 1) and int(y.max()) >= s_logits.shape[-1]:
        raise DataMismatchError(f"label {int(y.max())} is out of range for a model with {s_logits.shape[-1]} classes")
    if plain_ce:
        return F.cross_entropy(s_logits.float(), y), s_logits, None, y
    return kd_loss(s_logits, t_logits, y, cfg.alpha, cfg.tau, cfg.label_smoothing), s_logits, t_logits, y


_OPTIMIZER_SETTINGS = ("lr", "weight_decay", "momentum")


def _check_resumed_settings(old: dict, cfg: DistillConfig) -> None:
    """Refuse another optimizer on resume; warn when a setting the restored optimizer state overrides changed."""
    if "optimizer" in old and old["optimizer"] != cfg.optimizer:
        raise MPPluginError(
            f"the checkpoint was trained with optimizer {old['optimizer']!r}, this run asks for {cfg.optimizer!r}: "
            "resume with the same optimizer (its state is restored), or start a new run"
        )
    changed = [
        f"{k} {old[k]!r} → {getattr(cfg, k)!r}" for k in _OPTIMIZER_SETTINGS if k in old and old[k] != getattr(cfg, k)
    ]
    if changed:
        warnings.warn(
            f"resuming with changed optimizer settings ({', '.join(changed)}): the restored optimizer and "
            "learning-rate schedule keep the checkpoint's values",
            stacklevel=3,
        )


def _set_mode(student: nn.Module, cfg: DistillConfig) -> None:
    if cfg.eval_mode:
        student.eval()
        return
    student.train()
    if cfg.freeze_norm_stats:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


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
    *,
    loss: Literal["kd", "ce"] | LossFn = "kd",
    before_step: Sequence[StepHook] = (),
    epoch_end: Sequence[EpochHook] = (),
) -> DistillResult:
    """Train the pruned ``student`` (by default: distil ``teacher`` into it) with its masks kept.

    Args:
        student: the pruned model (trained in place; stays an ordinary module).
        teacher: the dense model (frozen: eval mode, no gradients), or None for
            plain label-smoothed fine-tuning (then ``config.alpha`` is treated as 0).
        train_loader: a sized iterable of batches. The built-in losses read ``(images
            (B,3,H,W), labels (B,))`` or bare image tensors (labels optional when
            ``alpha == 1``); ``mp_plugin.integrations.timm.make_loaders`` builds one. A custom
            ``loss`` gets each batch as the loader yields it (tensors moved to ``device``).
        config: :class:`DistillConfig` (default: the spec's α=0.5, τ=2, ε=0.1, 3 epochs).
        val_loader: evaluated once after training (top-1, teacher agreement).
        plan: the :class:`PrunePlan` that pruned ``student``; masks are read from its layers.
        keeper: a ready :class:`MaskKeeper` (overrides ``plan``'s masks), e.g. one made by
            :meth:`MaskKeeper.gate` for a gated phase.
        checkpoint_dir: rank 0 writes ``last.pt`` (+ ``plan.json``) here at the end and every
            ``config.checkpoint_every`` steps.
        resume: a checkpoint written by a previous run; its plan, masks and permutation
            must match this run's (else :class:`PlanMismatchError`).
        callbacks: called after every optimiser step with ``(step, model, metrics)``
            (``metrics["loss"]`` is that step's loss); objects with a ``step(model, step)``
            method (``CertificateCallback``) are called that way.
        dist: a :class:`DistContext` (default: the initialised process group, if any).
        device: where to train (default: the student's device, or the context's).
        show_progress: tqdm bar on rank 0 with loss, accuracy and sparsity.
        log: called with one-line status messages on rank 0.
        loss: ``"kd"`` (the recipe's loss), ``"ce"`` (plain cross-entropy on the labels, no
            teacher) or a callable ``loss(model, batch) -> scalar``; accuracy is NaN with a callable.
        before_step: hooks ``(step, student)`` after ``backward()`` (and clipping), before the step.
        epoch_end: hooks ``(student, epoch, optimizer)`` after every full epoch; they may replace
            modules and the optimiser's parameters (what the last one returns is recorded).

    Returns:
        :class:`DistillResult`.

    Raises:
        DenseStudentError: no masks and no plan, unless ``config.allow_dense``.
        DataMismatchError: model/data class counts or teacher/student logits differ.
        NonFiniteLossError: the loss became NaN/Inf (raised at that step).
        PlanMismatchError: the resume checkpoint belongs to a different plan/masks.
        MPPluginError: a held weight moved by the end (never expected).
    """
    cfg = config or DistillConfig()
    custom = callable(loss)
    if not custom and loss not in ("kd", "ce"):
        raise MPPluginError(f"loss must be 'kd', 'ce' or a callable, got {loss!r}")
    if teacher is None and cfg.alpha > 0:
        cfg = cfg.replace(alpha=0.0)
    dev = torch.device(device) if device is not None else None
    ctx = dist or DistContext.current(dev)
    if dev is None:
        dev = ctx.device or next(student.parameters()).device
    is_main = ctx.is_main
    say = (log or (lambda _m: None)) if is_main else (lambda _m: None)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)

    student.to(dev)
    teacher_flags: dict[nn.Module, bool] = {}
    if teacher is not None:
        teacher_flags = {m: m.training for m in teacher.modules()}
        teacher.to(dev).eval()  # frozen: only ever run under torch.no_grad()

    if keeper is None:
        keeper = MaskKeeper(student, masks_from_plan(student, plan) if plan is not None else None)
    state = None
    if resume is not None:
        state = read_checkpoint(resume)
        _check_resumed_settings(state.get("config") or {}, cfg)  # before anything of the caller's changes
        plan = restore_checkpoint(state, student, keeper, plan)
        say(f"resumed from {resume} at step {state['step']}")
    if not keeper.masks and not cfg.allow_dense:
        raise DenseStudentError(
            "the student has no pruned weights and no plan was given: this would train a dense model. "
            "Prune it first (mp_plugin.apply) or pass DistillConfig(allow_dense=True)"
        )
    keeper.apply()
    sparsity_before = keeper.sparsity
    if not custom:
        check_classes(student, None if loss == "ce" else teacher, train_loader, cfg)

    flags = {m: m.training for m in student.modules()}  # every train flag comes back after the run
    flags.update(teacher_flags)  # the teacher ran in eval mode
    _set_mode(student, cfg)
    optimizer = build_optimizer(student, cfg)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise DataMismatchError("the training loader is empty")
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    step = 0
    if state is not None:
        old = state.get("config") or {}
        if "epochs" in old:
            old_total = int(old["epochs"]) * steps_per_epoch
            if old.get("max_steps") is not None:
                old_total = min(old_total, int(old["max_steps"]))
            if old_total != total:
                warnings.warn(
                    f"resuming a run planned for {old_total} steps as one of {total}: the learning-rate "
                    "schedule's length changes mid-run (its restored state is for the old length)",
                    stacklevel=2,
                )
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    own_hooks = keeper.hook_count  # a keeper the caller attached to their own optimizer stays attached
    keeper.attach(optimizer)
    model = ctx.wrap(student)
    sampler = getattr(train_loader, "sampler", None)

    bar = progress(total=total, initial=step, desc="distill", unit="step", disable=not (show_progress and is_main))
    history: list[dict] = []
    epochs: list[dict] = []
    window = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, n
    first_loss = float("nan")
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    written: Path | None = None
    # an exact resume mid-epoch: the epoch's iterator is rebuilt from the generator it was first made with
    # (same shuffle), the done batches are drawn again (same augmentations) and skipped, then the generator
    # is set to where the run stopped (same dropout from there on)
    resume_rng = state.get("rng") if state is not None else None
    resume_epoch_rng = state.get("epoch_rng") if state is not None else None
    epoch_rng = resume_epoch_rng  # the current epoch's generator state at its start (kept for a final save)
    save_after_hooks = False
    t0 = time.perf_counter()
    try:
        while step < total:
            epoch = step // steps_per_epoch
            skip = step - epoch * steps_per_epoch
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if skip and resume_epoch_rng is not None:
                torch.set_rng_state(resume_epoch_rng)
            resume_epoch_rng = None
            epoch_rng = torch.get_rng_state()
            t_epoch, epoch_sum, epoch_n = time.perf_counter(), 0.0, 0
            for i, batch in enumerate(train_loader):
                if i < skip:
                    if i == skip - 1 and resume_rng is not None:
                        torch.set_rng_state(resume_rng)
                    continue
                resume_rng = None
                if step >= total:
                    break
                batch = _to_device(batch, dev)
                n_batch = _batch_size(batch)
                if custom:
                    with _autocast(dev, cfg.bf16):
                        value = loss(model, batch)
                    s_logits = t_logits = y = None
                else:
                    value, s_logits, t_logits, y = _kd_forward(model, teacher, batch, cfg, dev, loss == "ce")
                flag = torch.tensor([0.0 if torch.isfinite(value) else 1.0])
                ctx.all_reduce_sum(flag)
                if float(flag) > 0:
                    raise NonFiniteLossError(
                        f"the loss is {float(value.detach())} at step {step + 1} (epoch {epoch}); stopping. "
                        "Check the learning rate, the data (NaN/Inf pixels) and the model weights"
                    )
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                keeper.mask_grads()  # held entries' gradients do not count (the clip norm) or move moments
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                for hook in before_step:
                    hook(step + 1, student)
                optimizer.step()  # MaskKeeper puts held weights back in its post-step hook
                scheduler.step()
                step += 1
                step_loss = float(value.detach())
                epoch_sum += step_loss * n_batch
                epoch_n += n_batch
                correct = float("nan")
                if s_logits is not None:
                    with torch.no_grad():
                        ref = y if y is not None else (t_logits.argmax(-1) if t_logits is not None else None)
                        if ref is not None:
                            correct = float((s_logits.argmax(-1) == ref).sum())
                window += torch.tensor([step_loss * n_batch, correct, n_batch], dtype=torch.float64)
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "loss": step_loss,
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
                    if step == (epoch + 1) * steps_per_epoch:  # at an epoch's end: after its hooks have run
                        save_after_hooks = True
                    else:
                        written = save_checkpoint(
                            ckpt_path, student, keeper, plan, optimizer, scheduler, step, epoch, cfg.to_dict(),
                            epoch_rng=epoch_rng,
                        )  # fmt: skip
                if step >= total:  # stop before the loader draws another batch (the final save keeps this RNG)
                    break
            if step == (epoch + 1) * steps_per_epoch:  # a full epoch ended
                out = None
                for hook in epoch_end:
                    out = hook(student, epoch + 1, optimizer)
                if save_after_hooks:
                    save_after_hooks = False
                    written = save_checkpoint(
                        ckpt_path, student, keeper, plan, optimizer, scheduler, step, epoch + 1, cfg.to_dict()
                    )
                seconds_epoch = time.perf_counter() - t_epoch
                mean = epoch_sum / epoch_n if epoch_n else float("nan")
                epochs.append({"epoch": epoch + 1, "loss": mean, "seconds": seconds_epoch, "hook": out})
    finally:
        bar.close()
        keeper.detach(since=own_hooks)
        for m, flag in flags.items():
            m.training = flag
    seconds = time.perf_counter() - t0

    ctx.broadcast_buffers(student)  # ranks end with identical BatchNorm statistics, not only parameters
    leaked = keeper.violations()
    sparsity_after = keeper.measured_sparsity()
    if leaked:
        raise MPPluginError(f"{leaked} held weights moved during training: masks were not kept")
    if ckpt_path is not None and is_main:
        mid_epoch = step % steps_per_epoch != 0 and epoch_rng is not None
        written = save_checkpoint(
            ckpt_path, student, keeper, plan, optimizer, scheduler, step, step // steps_per_epoch, cfg.to_dict(),
            epoch_rng=epoch_rng if mid_epoch else None,  # a resume rebuilds this epoch's shuffle
        )  # fmt: skip
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
        epochs=epochs,
    )
