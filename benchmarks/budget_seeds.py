"""Seed-to-seed spread of the default budget's gain (issue 17): ``mp-bulk`` against global magnitude.

``budgets.py`` compares deterministic budgets, so its ± is the standard error over the
evaluation samples. Here each seed changes what a seed can change for the model, and the
spread of the gain across seeds is measured:

* ``fmnist_cnn``: the network itself: initialisation and data-order seed of its 2-epoch
  training recipe (``mp_plugin.evaluation.zoo``);
* ``minilm``: the probe texts and the calibration glosses (seed of ``accuracy.minilm_task``);
* ``efficientnet_lite0``: the real photo crops evaluated (crop seed; the calibration crops stay seed 2).

For every seed (no restore, ``budgets.py``'s loss): the ``mp-bulk`` budget against global
magnitude at 50/60/70 % unstructured, and the dense/2:4 mix at 25/35/45 % with its 2:4 layers
chosen by the default ``mp-bulk`` damage (and at β = 1), and by the calibrated ``measured`` rule
(each layer's 2:4 output error on the task's calibration data, not MP), against choosing by size
(equal removed weights); Δ = candidate − reference. The table gives the mean Δ over seeds, its sample standard deviation,
and whether mean Δ < −sd (better by more than the seed-to-seed spread). Usage::

    python benchmarks/budget_seeds.py --seeds 0 1 2 3 4 --threads 2 [--write-readme]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import Task, efficientnet_task, fmnist_task, minilm_task  # noqa: E402
from budgets import evaluate, per_sample_loss  # noqa: E402
from budgets_report import SEEDS_BEGIN, SEEDS_END, seeds_block  # noqa: E402
from common import read_marked_block, write_marked_block, write_result  # noqa: E402

from mp_plugin.budget.bulk_share import BulkShareConfig  # noqa: E402
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan  # noqa: E402
from mp_plugin.pruning.apply_plan import apply  # noqa: E402

SPARSITIES = (0.5, 0.6, 0.7)  # unstructured: mp-bulk budget against global magnitude
MIX = (0.25, 0.35, 0.45)  # dense/2:4 mix at equal removed weights: mp-bulk damage against size
MIX_BETAS = (1.0,)  # the mix damage at another β than the default, also against size
MODELS = ("fmnist_cnn", "minilm", "efficientnet_lite0")
README = Path(__file__).resolve().parent / "README.md"


def seeded_task(model: str, seed: int) -> Task:
    """The benchmark task of ``model`` at ``seed`` (see the module docstring for what the seed changes)."""
    if model == "minilm":  # the calibration (for the 'measured' mix rule) is budgets.py's; it does not move the probes
        return minilm_task(n_calib=120, seed=seed)
    if model == "efficientnet_lite0":
        return efficientnet_task(eval_seed=101 + seed)  # budgets.py's crops are seed 1; calibration crops seed 2
    from mp_plugin.evaluation.classifier_training import train_classifier
    from mp_plugin.evaluation.fashion_mnist import load_fashion_mnist
    from mp_plugin.evaluation.zoo import ZOO

    entry = ZOO[model]
    torch.manual_seed(seed)
    net = entry.build()
    train = load_fashion_mnist("train")
    train_classifier(net, train.images, train.labels, replace(entry.recipe, seed=seed))
    return fmnist_task(model, model=net.eval())


def _loss(task: Task, dense: torch.Tensor, p: PrunePlan) -> np.ndarray:
    m = copy.deepcopy(task.model)
    apply(m, p)
    return per_sample_loss(task, dense, evaluate(task, m)[1])


def run_seed(model: str, seed: int) -> list[dict]:
    """One seed: mp-bulk vs global magnitude (unstructured); the dense/2:4 mix by mp-bulk and by measurement vs size."""
    task = seeded_task(model, seed)
    _, dense = evaluate(task, copy.deepcopy(task.model))
    base = plan(task.model, 0.5, "unstructured", "magnitude")
    mix = PlanConfig(auto_patterns=("dense", "2:4"))
    cases = [
        ("unstructured", s, plan(task.model, s, "unstructured", "magnitude", reuse_fits=base), "magnitude")
        for s in SPARSITIES
    ] + [
        ("mix", s, plan(task.model, s, "auto", "magnitude", replace(mix, mix_rule="size"), reuse_fits=base), "size")
        for s in MIX
    ]
    mixes = [(part, s, ref, name) for part, s, ref, name in cases if part == "mix"]
    cases += [(f"mix beta={b}", s, ref, name) for b in MIX_BETAS for _, s, ref, name in mixes]
    cases += [("mix measured", s, ref, name) for _, s, ref, name in mixes]
    rows = []
    for part, s, ref, ref_name in cases:
        if part == "unstructured":
            cand = plan(task.model, s, "unstructured", "mp-bulk", reuse_fits=base)
        elif part == "mix measured":
            cfg = replace(mix, mix_rule="measured")
            cand = plan(task.model, s, "auto", "magnitude", cfg, reuse_fits=base, calibration=task.calibration)
        else:
            beta = float(part.split("=")[1]) if "=" in part else mix.bulk_share.mix_beta
            cfg = replace(mix, bulk_share=BulkShareConfig(mix_beta=beta))
            cand = plan(task.model, s, "auto", "magnitude", cfg, reuse_fits=base)
        same = [lp.n_prune for lp in cand.layers] == [lp.n_prune for lp in ref.layers] and part != "unstructured"
        a = _loss(task, dense, ref)
        b = a if same else _loss(task, dense, cand)
        diff = b - a
        rows.append(
            {
                "part": part,
                "model": model,
                "seed": seed,
                "sparsity": s,
                "reference": ref_name,
                "reference_loss": float(a.mean()),
                "candidate_loss": float(b.mean()),
                "delta": float(diff.mean()),
                "se_within_seed": float(diff.std(ddof=1) / np.sqrt(len(diff))),
                "same_layers": same,
                "removed": [ref.planned_sparsity, cand.planned_sparsity],
                "loadavg": os.getloadavg()[0],
            }
        )
        print(
            f"[{model} seed {seed}] {part} {int(100 * s)}%: {ref_name} {a.mean():.5f} candidate {b.mean():.5f} "
            f"Δ {rows[-1]['delta']:+.5f} load {rows[-1]['loadavg']:.1f}",
            flush=True,
        )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per part × model × sparsity: mean Δ over seeds, its sd, the mean within-seed SE, and the verdict."""
    out = []
    for part, model, s in dict.fromkeys((r["part"], r["model"], r["sparsity"]) for r in rows):
        sel = [r for r in rows if (r["part"], r["model"], r["sparsity"]) == (part, model, s)]
        d = np.asarray([r["delta"] for r in sel])
        if d.size < 2:
            continue
        mean, sd = float(d.mean()), float(d.std(ddof=1))
        out.append(
            {
                "part": part,
                "model": model,
                "sparsity": s,
                "reference": sel[0]["reference"],
                "seeds": int(d.size),
                "mean_delta": mean,
                "sd_delta": sd,
                "mean_se_within_seed": float(np.mean([r["se_within_seed"] for r in sel])),
                "worse_seeds": int((d > 0).sum()),
                "same_layers_seeds": int(sum(r["same_layers"] for r in sel)),
                "better_beyond_spread": mean < -sd,
                "not_worse_beyond_spread": mean <= sd,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry: writes benchmarks/results/budget_seeds.json (and the README block with --write-readme)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-readme", action="store_true", help="rewrite the generated block of benchmarks/README.md")
    ap.add_argument("--table-only", action="store_true", help="re-render from the stored JSON")
    args = ap.parse_args(argv)
    if not args.table_only:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        rows = [r for m in args.models for seed in args.seeds for r in run_seed(m, seed)]
        result = {
            "rows": rows,
            "summary": summary(rows),
            "seed_changes": {
                "fmnist_cnn": "initialisation and training data order (the network is retrained, 2 epochs)",
                "minilm": "the probe texts evaluated and the calibration glosses (which the measured mix rule uses)",
                "efficientnet_lite0": "the photo crops evaluated (the calibration crops stay fixed)",
            },
            "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t0,
            "loadavg_end": list(os.getloadavg()),
        }
        print(write_result("budget_seeds", result, packages=("transformers",)))
    block = seeds_block()
    print(block)
    if args.write_readme and block is not None:
        if read_marked_block(README.read_text(), SEEDS_BEGIN, SEEDS_END) is None:
            raise SystemExit(f"{README}: add the markers {SEEDS_BEGIN} / {SEEDS_END} first")
        write_marked_block(README, SEEDS_BEGIN, SEEDS_END, block)


if __name__ == "__main__":
    main()
