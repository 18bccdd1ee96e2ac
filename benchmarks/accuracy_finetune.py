"""Accuracy after a short, fixed distillation budget: real pretrained models, MP methods against SparseGPT/Wanda.

Every method prunes a fresh copy of the dense model exactly as in
``benchmarks/accuracy.py`` (same calibration data), then gets the SAME
fine-tuning budget on the one training loop (:func:`mp_plugin.recover.distill.distill`
with this benchmark's loss): distillation of the pruned student towards the dense
teacher, one pass over fixed batches in a fixed order, AdamW with
:func:`mp_plugin.recover.distill.optim.param_groups` (no decay on biases/norms), linear
warmup + cosine (:func:`~mp_plugin.recover.distill.optim.warmup_cosine`),
:class:`mp_plugin.masks.keep.MaskKeeper` attached (sparsity is asserted unchanged and pruned weights zero afterwards),
the student in eval mode (dropout off, BatchNorm statistics frozen), fixed seed.
The teacher's outputs are computed once and shared by all methods.

* ``--model minilm`` (default): real all-MiniLM-L6-v2. Loss = 1 − cosine of the
  mean-pooled embeddings on WordNet glosses disjoint from the probe's and the
  calibration's glosses; the token embedding table is frozen (it is never
  pruned). Reported: probe accuracy (probe re-fitted on the pruned features)
  and embedding cosine to the dense model, before → after.
* ``--model efficientnet_lite0``: real ImageNet EfficientNet-Lite0. Loss =
  τ²·KL(teacher/τ ‖ student/τ) on the logits (:func:`mp_plugin.recover.distill.loss.kd_term`)
  of unlabelled real photo crops (``real_photo_crops`` seed 3, 160 px by default,
  random horizontal flips; evaluation crops are seed 1, calibration crops seed 2,
  both 224 px). Reported: top-1
  agreement, KL and logit cosine to the dense model on the 48 held-out crops.
  Caveat: training and evaluation crops are different crops of the same 9
  source photos.
* ``--model fmnist_cnn``: the CNN trained here on Fashion-MNIST (mp_plugin.evaluation.zoo).
  Same KD loss on the first training images (the calibration uses the last 256).
  Reported: test accuracy plus fidelity on 2000 test images.

On the classifiers, SER+CAST (2:4) and Hybrid Magnitude–SER (50 %) run too; their
SER selection phase takes its steps out of the same budget (``--ser-steps``).

Usage::

    python benchmarks/accuracy_finetune.py --threads 2 --steps 200
    python benchmarks/accuracy_finetune.py --model efficientnet_lite0 --threads 1
    python benchmarks/accuracy_finetune.py --model fmnist_cnn --threads 1
    python benchmarks/accuracy_finetune.py --summarise accuracy-minilm-finetune accuracy-minilm-finetune-seed1
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (  # noqa: E402
    Task,
    efficientnet_task,
    fmnist_task,
    minilm_task,
    run_baseline,
    run_ours,
    run_restore,
    wordnet_glosses,
)
from common import write_result  # noqa: E402

from mp_plugin.evaluation.baselines import baseline_report  # noqa: E402
from mp_plugin.masks.keep import MaskKeeper  # noqa: E402
from mp_plugin.pruning.apply_plan import sparsity_report  # noqa: E402
from mp_plugin.recover.distill import DistillConfig  # noqa: E402
from mp_plugin.recover.distill import distill as run_loop  # noqa: E402
from mp_plugin.recover.distill.loss import kd_term  # noqa: E402
from mp_plugin.restore import RestoreConfig  # noqa: E402

MAX_LEN = 24
WEIGHT_DECAY = 0.01
EVAL_SEED, CALIB_SEED, TRAIN_SEED = 1, 2, 3  # real_photo_crops seeds (efficientnet_task uses 1 and 2)

Runner = Callable[[Task], torch.nn.Module]

# (setting, label, runner): the methods of issue 8, each on a fresh copy of the dense model.
MAGNITUDE_KN: tuple[str, str, Runner] = ("2:4", "magnitude k:n", lambda t: run_baseline(t, "2:4", "uniform-magnitude"))
SPARSEGPT: tuple[str, str, Runner] = ("2:4", "sparsegpt", lambda t: run_baseline(t, "2:4", "sparsegpt"))
WANDA_KN: tuple[str, str, Runner] = ("2:4", "wanda", lambda t: run_baseline(t, "2:4", "wanda"))
SEB_CAST: tuple[str, str, Runner] = ("2:4", "seb+cast", lambda t: run_ours(t, "2:4", "seb", 1.0, "cast", "none"))
SEB_CAST_PERM: tuple[str, str, Runner] = (
    "2:4",
    "seb+cast+perm(swap)",
    lambda t: run_ours(t, "2:4", "seb", 1.0, "cast", "swap"),
)
UNSTRUCTURED: tuple[tuple[str, str, Runner], ...] = (
    ("50%", "global-magnitude", lambda t: run_baseline(t, "50%", "global-magnitude")),
    ("50%", "wanda", lambda t: run_baseline(t, "50%", "wanda")),
    ("50%", "seb (σ₊, paper)", lambda t: run_ours(t, "50%", "seb", 1.0, "magnitude", "none")),
)
METHODS: tuple[tuple[str, str, Runner], ...] = (MAGNITUDE_KN, SPARSEGPT, WANDA_KN, SEB_CAST, *UNSTRUCTURED)
METHODS_CLASSIFIERS: tuple[tuple[str, str, Runner], ...] = (
    MAGNITUDE_KN,
    SPARSEGPT,
    WANDA_KN,
    SEB_CAST,
    SEB_CAST_PERM,
    *UNSTRUCTURED,
)
# the prune–restore comparison (issue 12): restored MP starting points against SparseGPT with its update
_SEQ = RestoreConfig(sequential=True)
RESTORE_METHODS: tuple[tuple[str, str, Runner], ...] = (
    ("2:4", "sparsegpt-obs", lambda t: run_baseline(t, "2:4", "sparsegpt-obs")),
    ("2:4", "mp cast-obs+perm+restore(seq)", lambda t: run_restore(t, "2:4", "seb", "cast-obs", "swap", _SEQ)),
    ("50%", "sparsegpt-obs", lambda t: run_baseline(t, "50%", "sparsegpt-obs")),
    ("50%", "uniform budget+obs+restore(seq)", lambda t: run_restore(t, "50%", "uniform", "obs", "none", _SEQ)),
)
MP_METHODS = {
    "mp cast-obs+perm+restore(seq)",
    "seb+cast",
    "seb+cast+perm(swap)",
    "seb (σ₊, paper)",
    "ser+cast",
    "hybrid magnitude–ser",
}

# Methods that train while they prune (ALGORITHM.md §2 items 5–6, 9). Their selection phase takes its
# steps from the SAME budget: the first ``--ser-steps`` distillation batches, the rest are distilled
# as for every other method, so every method sees the same number of optimiser steps in total.
SER_METHODS: tuple[tuple[str, str], ...] = (("2:4", "ser+cast"), ("50%", "hybrid magnitude–ser"))


def ser_prune(task: Task, setting: str, label: str, batches: list[dict], lr: float) -> torch.nn.Module:
    """SER (+CAST to 2:4) or Hybrid Magnitude–SER (global magnitude to 0.20, SER to 0.50) on a fresh copy.

    The selection phase is pure distillation (α = 1) towards the dense model on ``batches``
    (labels = the teacher's argmax, unused at α = 1), one optimiser step per batch.
    """
    from mp_plugin.recover.ser import HybridConfig, SERConfig, hybrid_magnitude_ser, ser_to_kn

    model = copy.deepcopy(task.model)
    loader = [(b["x"], b["target"].argmax(-1)) for b in batches]
    selection = DistillConfig(
        epochs=1, max_steps=len(batches), lr=lr, min_lr_ratio=0.25, weight_decay=0.0, alpha=1.0, warmup_steps=0
    )
    ser = SERConfig(extra=0.03, selection=selection, finetune=None)
    schedule = (0.5,) if label == "ser+cast" else (0.2, 0.5)
    result = hybrid_magnitude_ser(
        model, loader, teacher=task.model, config=HybridConfig(schedule=schedule, finetune=None, ser=ser)
    )
    if setting != "50%":
        ser_to_kn(model, task.model, result.masks, setting, calibration=task.calibration, prior_alpha=0.1)
    return model


# --------------------------------------------------------------------------- MiniLM data and loss


def distill_texts(task: Task, n: int, seed: int) -> list[str]:
    """``n`` WordNet glosses that are neither probe nor calibration glosses (fixed order)."""
    used = set(task.meta["probe_texts"]) | set(task.meta["calibration_texts"])
    pool = sorted({g for g, _ in wordnet_glosses()} - used)
    rng = random.Random(seed)
    rng.shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} disjoint glosses, need {n}")
    return pool[:n]


def make_batches(model: torch.nn.Module, texts: list[str], batch: int) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches plus the dense teacher's embeddings (computed once, shared by all methods)."""
    out = []
    for i in range(0, len(texts), batch):
        tok = model.tokenizer(
            texts[i : i + batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"
        )
        with torch.no_grad():
            target = model(tok["input_ids"], tok["attention_mask"])
        out.append({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"], "target": target})
    return out


def minilm_batches(task: Task, args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    """Distillation batches on disjoint WordNet glosses, plus the config entries they imply."""
    texts = distill_texts(task, args.steps * args.batch, args.seed)
    batches = make_batches(task.model, texts, args.batch)
    config = {
        "loss": "1 - cosine(student, dense teacher) on mean-pooled embeddings",
        "max_length": MAX_LEN,
        "distill_texts": len(texts),
        "frozen": ["encoder.embeddings.word_embeddings.weight"],
        "dropout": "off (eval mode)",
        "probe_test_size": len(task.meta["probe_texts"]) - len(task.meta["probe_texts"]) * 3 // 5,
    }
    return batches, config


def minilm_loss(student: torch.nn.Module, b: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    """1 − cosine between the student's and the teacher's mean-pooled embeddings."""
    out = student(b["input_ids"], b["attention_mask"])
    return (1.0 - F.cosine_similarity(out, b["target"], dim=-1)).mean()


def minilm_dense_line(dense: dict[str, float], cfg: dict[str, Any]) -> str:
    """The markdown line describing the dense model and the probe test set."""
    return (
        f"Dense: probe accuracy {dense['probe_accuracy']:.4f}, embedding cosine 1.0000. "
        f"Probe test set: {cfg['probe_test_size']} glosses (one gloss = {1 / cfg['probe_test_size']:.4f})."
    )


# --------------------------------------------------------------------------- EfficientNet-Lite0 data and loss


def photo_batches(
    teacher: torch.nn.Module, steps: int, batch: int, size: int, seed: int
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """``steps`` batches of fresh real photo crops (seed ``seed``), random flips, teacher logits computed once.

    Every crop is used once, in a fixed order; horizontal flips are drawn from a
    generator seeded with ``seed``. Returns the batches and the number of flipped crops.
    """
    from mp_plugin.evaluation.photos import real_photo_crops

    x = real_photo_crops(steps * batch, size, seed=seed)
    flip = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) < 0.5
    x[flip] = x[flip].flip(-1)
    teacher.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            out.append({"x": xb, "target": teacher(xb)})
    return out, int(flip.sum())


def efficientnet_batches(task: Task, args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    """Distillation batches on unlabelled photo crops disjoint from the evaluation/calibration crops."""
    if args.resolution % 32:
        # the model's static "same" padding is fixed at construction (224); it stays exact when every
        # stride-2 conv sees an even size, i.e. for multiples of 32
        raise SystemExit(f"--resolution must be a multiple of 32, got {args.resolution}")
    batches, flipped = photo_batches(task.model, args.steps, args.batch, args.resolution, TRAIN_SEED)
    config = {
        "loss": f"tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)) on logits, tau={args.tau}",
        "tau": args.tau,
        "train_crops": args.steps * args.batch,
        "train_resolution": args.resolution,
        "train_flipped": flipped,
        "crop_seeds": {"train": TRAIN_SEED, "evaluation": EVAL_SEED, "calibration": CALIB_SEED},
        "eval_crops": 48,
        "eval_resolution": 224,
        "frozen": [],
        "dropout": "off (eval mode)",
        "batchnorm": "eval mode: running statistics frozen, affine parameters trained",
        "data_caveat": (
            "training, calibration and evaluation crops are different random crops of the SAME 9 source photos "
            "(mp_plugin.evaluation.photos.builtin_photo_paths); no labels ship offline, so quality is fidelity to the dense model"
        ),
    }
    return batches, config


def efficientnet_loss(student: torch.nn.Module, b: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    """Temperature-scaled KL of the student's logits to the teacher's."""
    return kd_term(student(b["x"]), b["target"], args.tau)


def efficientnet_dense_line(dense: dict[str, float], cfg: dict[str, Any]) -> str:
    """The markdown lines describing the dense reference, the data and its caveat."""
    return (
        f"Dense: top-1 agreement 1.0000, KL 0.0000, logit cosine 1.0000 (the reference). "
        f"Evaluation: {cfg['eval_crops']} held-out real photo crops at {cfg['eval_resolution']} "
        f"(one crop = {1 / cfg['eval_crops']:.4f}). Training: {cfg['train_crops']} other crops at "
        f"{cfg['train_resolution']}, {cfg['train_flipped']} flipped; {cfg['loss']}.\n\n"
        f"Caveat: {cfg['data_caveat']}."
    )


# --------------------------------------------------------------------------- Fashion-MNIST CNN (trained here)


def fmnist_batches(task: Task, args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    """Distillation batches on Fashion-MNIST training images (the calibration uses the last 256; these the first)."""
    from mp_plugin.evaluation.fashion_mnist import load_fashion_mnist

    n = args.steps * args.batch
    x = load_fashion_mnist("train").images[:n]
    if len(x) < n or n > 60000 - 256:
        raise SystemExit(f"need {n} training images disjoint from the 256 calibration images")
    task.model.eval()
    with torch.no_grad():
        batches = [
            {"x": x[i : i + args.batch], "target": task.model(x[i : i + args.batch])} for i in range(0, n, args.batch)
        ]
    config = {
        "loss": f"tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)) on logits, tau={args.tau}",
        "tau": args.tau,
        "train_images": n,
        "eval_images": 2000,
        "frozen": [],
        "dropout": "off (eval mode)",
        "data_caveat": "distillation uses training images (labels unused); accuracy is on the first 2000 test images",
    }
    return batches, config


def fmnist_dense_line(dense: dict[str, float], cfg: dict[str, Any]) -> str:
    """The markdown lines describing the dense reference and the data."""
    return (
        f"Dense: test accuracy {dense['test_accuracy']:.4f} on {cfg['eval_images']} test images (fidelity to itself 1). "
        f"Training: the first {cfg['train_images']} Fashion-MNIST training images; {cfg['loss']}. "
        f"Note: {cfg['data_caveat']}."
    )


# --------------------------------------------------------------------------- per-model setup


@dataclass
class FinetuneModel:
    """What differs between the models: task, methods, data, loss, defaults and table columns."""

    task: Callable[[argparse.Namespace], Task]
    methods: tuple[tuple[str, str, Runner], ...]
    batches: Callable[[Task, argparse.Namespace], tuple[list[dict], dict[str, Any]]]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor], argparse.Namespace], torch.Tensor]
    frozen: Callable[[torch.nn.Module], list[torch.Tensor]]
    defaults: dict[str, Any]
    columns: tuple[tuple[str, str], ...]  # (markdown header, metric key)
    dense_line: Callable[[dict[str, float], dict[str, Any]], str]
    packages: tuple[str, ...]
    sparsity_column: bool = False
    ser_methods: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()


MODELS: dict[str, FinetuneModel] = {
    "minilm": FinetuneModel(
        task=lambda args: minilm_task(seed=args.seed, n_calib=args.minilm_calib),
        methods=METHODS,
        batches=minilm_batches,
        loss=minilm_loss,
        frozen=lambda m: [m.encoder.embeddings.word_embeddings.weight],
        defaults={"steps": 200, "batch": 32, "lr": 1e-4, "warmup": 20},
        columns=(("probe acc", "probe_accuracy"), ("emb. cosine", "embedding_cosine")),
        dense_line=minilm_dense_line,
        packages=("nvidia-modelopt", "transformers"),
    ),
    "efficientnet_lite0": FinetuneModel(
        task=lambda args: efficientnet_task(),
        methods=METHODS_CLASSIFIERS,
        batches=efficientnet_batches,
        loss=efficientnet_loss,
        frozen=lambda m: [],
        defaults={"steps": 64, "batch": 16, "lr": 1e-3, "warmup": 6, "resolution": 160},
        columns=(("top-1 agreement", "top1_agreement"), ("KL", "kl"), ("logit cosine", "logit_cosine")),
        dense_line=efficientnet_dense_line,
        packages=("nvidia-modelopt", "efficientnet-lite-pytorch"),
        sparsity_column=True,
        ser_methods=SER_METHODS,
        notes=(
            "Default lr 1e-3 was chosen from {1e-4, 3e-4, 1e-3} by the final training loss of a 20-step pilot "
            "of the magnitude k:n baseline only; training at 160 px (the static 'same' padding is exact for "
            "multiples of 32) to afford more steps in the time budget, evaluation at 224 px.",
        ),
    ),
    "fmnist_cnn": FinetuneModel(
        task=lambda args: fmnist_task("fmnist_cnn"),
        methods=METHODS_CLASSIFIERS,
        batches=fmnist_batches,
        loss=efficientnet_loss,
        frozen=lambda m: [],
        defaults={"steps": 100, "batch": 64, "lr": 1e-3, "warmup": 10},
        columns=(
            ("test accuracy", "test_accuracy"),
            ("top-1 agreement", "top1_agreement"),
            ("KL", "kl"),
            ("logit cosine", "logit_cosine"),
        ),
        dense_line=fmnist_dense_line,
        packages=("nvidia-modelopt",),
        sparsity_column=True,
        ser_methods=SER_METHODS,
    ),
}


# --------------------------------------------------------------------------- the shared budget


def distill(
    student: torch.nn.Module,
    batches: list[dict],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    lr: float,
    warmup: int,
    seed: int,
    frozen: list[torch.Tensor] | None = None,
) -> dict:
    """The fixed budget: one pass over ``batches`` (one AdamW step each), masks kept; returns a log.

    The one training loop (:func:`mp_plugin.recover.distill.distill`) with this benchmark's loss:
    AdamW over :func:`~mp_plugin.recover.distill.optim.param_groups`, warmup + cosine, the student
    in eval mode (dropout off, BatchNorm statistics frozen), a :class:`MaskKeeper` on its zeros;
    ``frozen`` parameters take no gradient. Asserts that the sparsity is unchanged (the loop
    itself checks that every pruned weight is still exactly zero).
    """
    frozen = frozen or []
    for p in frozen:
        p.requires_grad_(False)
    config = DistillConfig(
        epochs=1, optimizer="adamw", lr=lr, weight_decay=WEIGHT_DECAY, warmup_steps=warmup, seed=seed,
        eval_mode=True, allow_dense=True, log_every=max(1, len(batches)),
    )  # fmt: skip
    keeper = MaskKeeper(student)
    before = sparsity_report(student).total_sparsity
    losses: list[float] = []
    try:
        run_loop(
            student,
            None,
            batches,
            config,
            keeper=keeper,
            show_progress=False,
            loss=lambda model, b: loss_fn(model, b),
            callbacks=[lambda _step, _model, metrics: losses.append(metrics["loss"])],
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    after = sparsity_report(student).total_sparsity
    assert abs(after - before) < 1e-9, f"sparsity changed {before} → {after}"
    k = max(1, len(losses) // 10)
    return {
        "sparsity_before": before,
        "sparsity_after": after,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "masked_layers": len(keeper.masks),
    }


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def to_markdown(result: dict) -> str:
    """Before → after table."""
    spec = MODELS[result["model"]]
    d = result["dense"]
    cfg = result["config"]
    cols = " | ".join(f"{title} before → after" for title, _ in spec.columns)
    sp_head, sp_rule = (" sparsity |", "---|") if spec.sparsity_column else ("", "")
    lines = [
        f"### {result['model']} after a fixed distillation budget ({cfg['steps']} AdamW steps × batch {cfg['batch']}, "
        f"lr {cfg['lr']}, warmup {cfg['warmup']} + cosine, {cfg['threads']} threads)",
        "",
        spec.dense_line(d, cfg),
        "",
        f"| setting | method | {cols} | distill loss first → last |{sp_head} s |",
        "|---|---|" + "---|" * len(spec.columns) + f"---|{sp_rule}---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['setting']} | {r['method']} |" + " n/a |" * len(spec.columns) + f" {r['skipped']} | |")
            continue
        b, a = r["before"], r["after"]
        cells = " | ".join(f"{_fmt(b[key])} → {_fmt(a[key])}" for _, key in spec.columns)
        sp = f" {r['distill']['sparsity_after']:.4f} |" if spec.sparsity_column else ""
        lines.append(
            f"| {r['setting']} | {r['method']} | {cells} | "
            f"{r['distill']['loss_first']:.4f} → {r['distill']['loss_last']:.4f} |{sp} {r['seconds']:.0f} |"
        )
    if spec.sparsity_column:
        lines += [
            "",
            "Sparsity = zeros / all Linear+Conv weights after pruning (held fixed by MaskKeeper); it includes "
            "weights that are already exactly zero in the dense model.",
        ]
    ser_rows = [r for r in result["rows"] if r.get("distill", {}).get("selection_steps")]
    if ser_rows:
        n = ser_rows[0]["distill"]["selection_steps"]
        lines += [
            "",
            f"{', '.join(r['method'] for r in ser_rows)}: the SER selection phase used the first {n} of the "
            f"{cfg['steps']} batches (pure distillation, lr {cfg.get('ser_lr')}), and only the remaining "
            f"{cfg['steps'] - n} were distilled afterwards: the same total number of optimiser steps as every method. "
            "'before' is after the selection phase.",
        ]
    for r in result["rows"]:
        rep = r.get("baseline_report")
        if rep and rep.get("fallback"):
            lines += ["", f"{r['setting']} {r['method']}: {len(rep['fallback'])} target layers fell back:"]
            lines += [f"- `{name}`: {why}" for name, why in rep["fallback"].items()]
        elif rep:
            lines += [
                "",
                f"{r['setting']} {r['method']}: ModelOpt's SparseGPT mask on all {len(rep['modelopt'])} 2:4 target "
                f"layers (registered for the call: {', '.join(rep['registered']) or 'none'}).",
            ]
    for note in spec.notes:
        lines += ["", note]
    lines += ["", f"Total runtime {result['seconds']:.0f} s; load average at end {result['loadavg_end']}.", ""]
    return "\n".join(lines)


def summarise_seeds(names: list[str], out: str) -> Path:
    """Mean ± sample sd over runs (one per seed) of the rows every run has; writes ``<out>.md``.

    Args:
        names: result names in ``benchmarks/results`` (e.g. one per ``--seed``).
        out: name of the markdown file written next to them.
    """
    import json
    import statistics

    results_dir = Path(__file__).resolve().parent / "results"
    runs = [json.loads((results_dir / f"{n}.json").read_text()) for n in names]
    keys = [(r["setting"], r["method"]) for r in runs[0]["rows"] if "skipped" not in r]
    metrics = [key for _, key in MODELS[runs[0]["model"]].columns]
    lines = [
        f"### {runs[0]['model']}: after the fixed distillation budget, mean ± sd over seeds "
        f"{[r['config']['seed'] for r in runs]} ({', '.join(names)})",
        "",
        "Each seed re-draws the probe split, the calibration texts and the distillation data order.",
        "",
        "| setting | method | n | " + " | ".join(f"{m} before → after" for m in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for setting, method in keys:
        rows = [
            r
            for run in runs
            for r in run["rows"]
            if (r["setting"], r["method"]) == (setting, method) and "skipped" not in r
        ]
        cells = []
        for m in metrics:
            b = [r["before"][m] for r in rows]
            a = [r["after"][m] for r in rows]
            sd = statistics.stdev(a) if len(a) > 1 else float("nan")
            cells.append(f"{statistics.mean(b):.3f} → {statistics.mean(a):.3f} ± {sd:.3f}")
        lines.append(f"| {setting} | {method} | {len(rows)} | " + " | ".join(cells) + " |")
    path = results_dir / f"{out}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry: writes benchmarks/results/accuracy-<model>-finetune.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="minilm")
    ap.add_argument(
        "--steps", type=int, default=None, help="default: 200 (minilm), 64 (efficientnet_lite0), 100 (fmnist_cnn)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="default: 32 (minilm), 16 (efficientnet_lite0), 64 (fmnist_cnn)"
    )
    ap.add_argument(
        "--lr", type=float, default=None, help="default: 1e-4 (minilm), 1e-3 (efficientnet_lite0, fmnist_cnn)"
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="default: 20 (minilm), 6 (efficientnet_lite0), 10 (fmnist_cnn)"
    )
    ap.add_argument("--tau", type=float, default=2.0, help="KD temperature (efficientnet_lite0)")
    ap.add_argument("--resolution", type=int, default=None, help="training crop size (efficientnet_lite0: 160)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ser-steps", type=int, default=16, help="SER/Hybrid selection steps, taken from the budget")
    ap.add_argument("--ser-lr", type=float, default=4e-4, help="SER/Hybrid selection-phase learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suite", choices=("full", "restore"), default="full", help="restore: the prune–restore rows")
    ap.add_argument("--minilm-calib", type=int, default=40, help="MiniLM calibration glosses (restore needs ≥ d rows)")
    ap.add_argument("--only-settings", nargs="*", default=None, help="settings to run, e.g. 2:4 (default: all)")
    ap.add_argument("--only", nargs="*", default=None, help="method labels to run (default: all)")
    ap.add_argument("--name", default=None, help="result name (default: accuracy-<model>-finetune)")
    ap.add_argument(
        "--summarise",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only summarise these runs over seeds (no training)",
    )
    args = ap.parse_args(argv)
    if args.summarise:
        print(summarise_seeds(args.summarise, (args.name or f"accuracy-{args.model}-finetune") + "-seeds"))
        return
    spec = MODELS[args.model]
    for key, value in spec.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = args.name or f"accuracy-{args.model}-finetune"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    task = spec.task(args)
    dense = task.evaluate(task.model)
    batches, data_config = spec.batches(task, args)
    print(f"dense {dense}; {len(batches)} batches ready ({time.perf_counter() - t0:.0f}s) load={os.getloadavg()}")
    rows = []
    ser_methods = spec.ser_methods if args.suite == "full" else ()
    methods = spec.methods if args.suite == "full" else RESTORE_METHODS
    plain = [(setting, label, runner, batches) for setting, label, runner in methods]
    selection, rest = batches[: args.ser_steps], batches[args.ser_steps :]
    for setting, label in ser_methods:
        plain.append((setting, label, lambda t, s=setting, lb=label: ser_prune(t, s, lb, selection, args.ser_lr), rest))
    for setting, label, runner, train in plain:
        if (args.only and label not in args.only) or (args.only_settings and setting not in args.only_settings):
            continue
        t1 = time.perf_counter()
        pruned = runner(task)
        before = task.evaluate(pruned)
        t2 = time.perf_counter()
        log = distill(
            pruned, train, lambda m, b: spec.loss(m, b, args), args.lr, args.warmup, args.seed, spec.frozen(pruned)
        )
        log["selection_steps"] = len(batches) - len(train)
        t3 = time.perf_counter()
        after = task.evaluate(pruned)
        report = baseline_report(pruned)
        rows.append(
            {
                "setting": setting,
                "method": label,
                "mp_method": label in MP_METHODS,
                "before": before,
                "after": after,
                "distill": log,
                **({"baseline_report": report.to_dict()} if report is not None else {}),
                "prune_eval_seconds": t2 - t1,
                "distill_seconds": t3 - t2,
                "seconds": time.perf_counter() - t1,
                "loadavg": list(os.getloadavg()),
            }
        )
        metrics = " ".join(f"{key} {before[key]:.4f}→{after[key]:.4f}" for _, key in spec.columns)
        print(
            f"{setting:>4} {label:<20} {metrics} loss {log['loss_first']:.4f}→{log['loss_last']:.4f} "
            f"sparsity {log['sparsity_after']:.4f} (prune {t2 - t1:.0f}s, distill {t3 - t2:.0f}s) "
            f"load={os.getloadavg()[0]:.1f}",
            flush=True,
        )
    result = {
        "model": args.model,
        "config": {
            "steps": len(batches),
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": WEIGHT_DECAY,
            **data_config,
            **({"notes": list(spec.notes)} if spec.notes else {}),
            "threads": torch.get_num_threads(),
            "seed": args.seed,
            "ser_steps": args.ser_steps if spec.ser_methods else 0,
            "ser_lr": args.ser_lr,
            "suite": args.suite,
            "minilm_calibration_texts": args.minilm_calib if args.model == "minilm" else None,
        },
        "dense": dense,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "loadavg_end": list(os.getloadavg()),
    }
    path = write_result(name, result, packages=spec.packages)
    path.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {path} ({result['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
