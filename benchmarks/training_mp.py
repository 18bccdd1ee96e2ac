"""Training-time MP pruning on the real Fashion-MNIST: none vs MP vs L1+L2 vs MP+L1+L2.

The 2023 paper (ALGORITHM.md §5, "Fully-connected Fashion-MNIST") reports, for
[784, 3000×4, 500, 10] trained 100 epochs with SGD(0.9), lr 0.01 ×0.96 every 4
epochs, pruning every 4 epochs with f = max(0, 1 − e/200): test accuracy
71.64 (none) → 81.22 (MP) → 81.70 (L1+L2) → 90.53 (MP + L1+L2, 1e−6 each).

This benchmark runs the same recipe family at a CPU budget: a [784, 1000, 1000, 10]
ReLU MLP, a fixed training subset, a few epochs, pruning every epoch with the
horizon scaled so f ends at 0.5 as in the paper (f = max(0, 1 − e/(2·epochs))).
Every arm starts from the same initialisation per seed and sees the same batches.
Threads are pinned; the load average is logged. Writes benchmarks/results/training_mp.json.

Usage: ``python benchmarks/training_mp.py [--epochs 6 --train 15000 --seeds 0 --threads 1]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from mp_plugin.evaluation.classifier_training import TrainConfig, accuracy, train_classifier  # noqa: E402
from mp_plugin.evaluation.fashion_mnist import load_fashion_mnist  # noqa: E402
from mp_plugin.recover.training_mp import LinearDecayKeep, MPSingularValuePruning, elastic_net_penalty  # noqa: E402

ARMS = ("none", "mp", "l1l2", "mp+l1l2")


def make_mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    """ReLU MLP on flattened (B, 1, 28, 28) inputs, PyTorch default init under ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def run_arm(arm: str, seed: int, args: argparse.Namespace, data: dict) -> dict:
    """Train one arm from the seed's initialisation; return accuracies (%), ranks and seconds."""
    model = make_mlp(tuple(args.sizes), seed)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr, momentum=0.9,
        lr_decay=0.96, lr_decay_every=4, seed=seed,
    )  # fmt: skip
    callback = MPSingularValuePruning(every=1, schedule=LinearDecayKeep(2.0 * args.epochs)) if "mp" in arm else None
    penalty = (lambda m: elastic_net_penalty(m, args.l1, args.l2)) if "l1l2" in arm else None
    t0 = time.perf_counter()
    logs = train_classifier(model, data["xtr"], data["ytr"], cfg, penalty=penalty, on_epoch_end=callback)
    seconds = time.perf_counter() - t0
    steps = callback.history if callback is not None else []
    return {
        "arm": arm,
        "seed": seed,
        "train_acc": 100.0 * accuracy(model, data["xtr"], data["ytr"]),
        "test_acc": 100.0 * accuracy(model, data["xte"], data["yte"]),
        "final_loss": logs[-1].loss,
        "seconds": seconds,
        "prune_steps": [
            {
                "epoch": s.epoch,
                "keep_fraction": s.keep_fraction,
                "kept": [r.kept for r in s.layers],
                "spikes": [r.n_spikes for r in s.layers],
                "full": [r.full_rank for r in s.layers],
            }
            for s in steps
        ],
    }


def main() -> None:
    """Parse arguments, run every arm for every seed, print a table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[784, 1000, 1000, 10])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train", type=int, default=15000, help="training subset size (60000 = all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--l1", type=float, default=1e-6)
    ap.add_argument("--l2", type=float, default=1e-6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    train = load_fashion_mnist("train").subset(args.train, seed=0)
    test = load_fashion_mnist("test")
    data = {"xtr": train.images, "ytr": train.labels, "xte": test.images, "yte": test.labels}
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            row = run_arm(arm, seed, args, data)
            runs.append(row)
            print(f"seed {seed} {arm:8s} train {row['train_acc']:6.2f}  test {row['test_acc']:6.2f}  "
                  f"{row['seconds']:6.1f}s  load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    summary = {}
    for arm in args.arms:
        rows = [r for r in runs if r["arm"] == arm]
        test_acc = torch.tensor([r["test_acc"] for r in rows])
        kept = rows[0]["prune_steps"][-1]["kept"] if rows[0]["prune_steps"] else None
        summary[arm] = {
            "test_mean": float(test_acc.mean()),
            "test_std": float(test_acc.std()) if len(rows) > 1 else 0.0,
            "train_mean": sum(r["train_acc"] for r in rows) / len(rows),
            "final_kept_singular_values": kept,
        }
    paper = {"none": 71.64, "mp": 81.22, "l1l2": 81.70, "mp+l1l2": 90.53}
    path = write_result(
        "training_mp",
        {
            "config": {**vars(args), "test_size": len(test), "schedule": f"f = max(0, 1 - e/{2 * args.epochs})"},
            "loadavg_at_start": load_start,
            "torch_threads": torch.get_num_threads(),
            "summary": summary,
            "paper_test_acc_100_epochs_784_3000x4_500_10": paper,
            "runs": runs,
        },
    )
    for arm, s in summary.items():
        print(f"{arm:8s} test {s['test_mean']:.2f} ± {s['test_std']:.2f}  (paper {paper[arm]:.2f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
