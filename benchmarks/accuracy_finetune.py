"""Accuracy after a short, fixed distillation budget: real MiniLM, MP methods against SparseGPT/Wanda.

Every method prunes a fresh copy of the dense all-MiniLM-L6-v2 exactly as in
``benchmarks/accuracy.py`` (same calibration glosses), then gets the SAME
fine-tuning budget: embedding distillation of the pruned student towards the
dense teacher (loss = 1 − cosine of the mean-pooled embeddings) on WordNet
glosses disjoint from the probe's and the calibration's glosses. AdamW with
:func:`mp_plugin.distill.optim.param_groups` (no decay on biases/norms),
linear warmup + cosine (:func:`warmup_cosine`), :class:`mp_plugin.masks.MaskKeeper`
attached (sparsity is asserted unchanged afterwards), the token embedding
table frozen (it is never pruned), dropout off, fixed seed and data order.

Reported per method: probe accuracy (probe re-fitted on the pruned features)
and embedding cosine to the dense model, before → after the budget. Usage::

    python benchmarks/accuracy_finetune.py --threads 2 --steps 200
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import Task, minilm_task, run_baseline, run_ours, wordnet_glosses  # noqa: E402
from common import write_result  # noqa: E402

from mp_plugin.distill.optim import param_groups, warmup_cosine  # noqa: E402
from mp_plugin.masks import MaskKeeper  # noqa: E402
from mp_plugin.pruning import sparsity_report  # noqa: E402

MAX_LEN = 24

# (setting, label, runner): the methods of issue 8, each on a fresh copy of the dense model.
METHODS: tuple[tuple[str, str, Callable[[Task], torch.nn.Module]], ...] = (
    ("2:4", "magnitude k:n", lambda t: run_baseline(t, "2:4", "uniform-magnitude")),
    ("2:4", "sparsegpt", lambda t: run_baseline(t, "2:4", "sparsegpt")),
    ("2:4", "wanda", lambda t: run_baseline(t, "2:4", "wanda")),
    ("2:4", "seb+cast", lambda t: run_ours(t, "2:4", "seb", 1.0, "cast", "none")),
    ("50%", "global-magnitude", lambda t: run_baseline(t, "50%", "global-magnitude")),
    ("50%", "wanda", lambda t: run_baseline(t, "50%", "wanda")),
    ("50%", "seb (σ₊, paper)", lambda t: run_ours(t, "50%", "seb", 1.0, "magnitude", "none")),
)
MP_METHODS = {"seb+cast", "seb (σ₊, paper)"}


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


def distill(student: torch.nn.Module, batches: list[dict], lr: float, warmup: int, seed: int) -> dict:
    """The fixed budget: one pass over ``batches`` (one AdamW step each), masks kept; returns a log."""
    torch.manual_seed(seed)
    student.eval()  # dropout off: identical, deterministic budget for every method
    emb = student.encoder.embeddings.word_embeddings.weight
    emb.requires_grad_(False)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(student, weight_decay=0.01)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    sched = warmup_cosine(opt, total_steps=len(batches), warmup_steps=warmup)
    keeper = MaskKeeper(student).attach(opt)
    before = sparsity_report(student).total_sparsity
    losses = []
    for b in batches:
        out = student(b["input_ids"], b["attention_mask"])
        loss = (1.0 - F.cosine_similarity(out, b["target"], dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    keeper.detach()
    emb.requires_grad_(True)
    after = sparsity_report(student).total_sparsity
    assert abs(after - before) < 1e-9, f"sparsity changed {before} → {after}"
    for name, mask in keeper.masks.items():
        assert not bool(keeper._weight(name).detach()[~mask].any()), f"{name}: pruned weight became non-zero"
    k = max(1, len(losses) // 10)
    return {
        "sparsity_before": before,
        "sparsity_after": after,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "masked_layers": len(keeper.masks),
    }


def to_markdown(result: dict) -> str:
    """Before → after table."""
    d = result["dense"]
    cfg = result["config"]
    lines = [
        f"### minilm after a fixed distillation budget ({cfg['steps']} AdamW steps × batch {cfg['batch']}, "
        f"lr {cfg['lr']}, warmup {cfg['warmup']} + cosine, {cfg['threads']} threads)",
        "",
        f"Dense: probe accuracy {d['probe_accuracy']:.4f}, embedding cosine 1.0000. "
        f"Probe test set: {cfg['probe_test_size']} glosses (one gloss = {1 / cfg['probe_test_size']:.4f}).",
        "",
        "| setting | method | probe acc before → after | emb. cosine before → after | distill loss first → last | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['setting']} | {r['method']} | n/a | n/a | {r['skipped']} | |")
            continue
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['setting']} | {r['method']} | {b['probe_accuracy']:.3f} → {a['probe_accuracy']:.3f} | "
            f"{b['embedding_cosine']:.3f} → {a['embedding_cosine']:.3f} | "
            f"{r['distill']['loss_first']:.4f} → {r['distill']['loss_last']:.4f} | {r['seconds']:.0f} |"
        )
    lines += ["", f"Total runtime {result['seconds']:.0f} s; load average at end {result['loadavg_end']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry: writes benchmarks/results/accuracy-minilm-finetune.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="method labels to run (default: all)")
    ap.add_argument("--name", default="accuracy-minilm-finetune")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    task = minilm_task(seed=args.seed)
    dense = task.evaluate(task.model)
    texts = distill_texts(task, args.steps * args.batch, args.seed)
    batches = make_batches(task.model, texts, args.batch)
    print(f"dense {dense}; {len(batches)} batches ready ({time.perf_counter() - t0:.0f}s) load={os.getloadavg()}")
    rows = []
    for setting, label, runner in METHODS:
        if args.only and label not in args.only:
            continue
        t1 = time.perf_counter()
        pruned = runner(task)
        before = task.evaluate(pruned)
        t2 = time.perf_counter()
        log = distill(pruned, batches, args.lr, args.warmup, args.seed)
        t3 = time.perf_counter()
        after = task.evaluate(pruned)
        rows.append(
            {
                "setting": setting,
                "method": label,
                "mp_method": label in MP_METHODS,
                "before": before,
                "after": after,
                "distill": log,
                "prune_eval_seconds": t2 - t1,
                "distill_seconds": t3 - t2,
                "seconds": time.perf_counter() - t1,
                "loadavg": list(os.getloadavg()),
            }
        )
        print(
            f"{setting:>4} {label:<18} probe {before['probe_accuracy']:.4f}→{after['probe_accuracy']:.4f} "
            f"cos {before['embedding_cosine']:.4f}→{after['embedding_cosine']:.4f} "
            f"loss {log['loss_first']:.4f}→{log['loss_last']:.4f} sparsity {log['sparsity_after']:.4f} "
            f"(prune {t2 - t1:.0f}s, distill {t3 - t2:.0f}s) load={os.getloadavg()[0]:.1f}",
            flush=True,
        )
    result = {
        "model": "minilm",
        "config": {
            "steps": len(batches),
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": 0.01,
            "loss": "1 - cosine(student, dense teacher) on mean-pooled embeddings",
            "max_length": MAX_LEN,
            "distill_texts": len(texts),
            "frozen": ["encoder.embeddings.word_embeddings.weight"],
            "dropout": "off (eval mode)",
            "threads": torch.get_num_threads(),
            "seed": args.seed,
            "probe_test_size": len(task.meta["probe_texts"]) - len(task.meta["probe_texts"]) * 3 // 5,
        },
        "dense": dense,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "loadavg_end": list(os.getloadavg()),
    }
    path = write_result(args.name, result, packages=("nvidia-modelopt", "transformers"))
    path.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {path} ({result['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
