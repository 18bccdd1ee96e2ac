"""Run under ``torchrun --nproc_per_node 2``: layer-parallel ``plan(..., distributed=True)`` on gloo (CPU).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/plan_ddp_worker.py OUT LAYER``.
Every rank writes ``OUT/rank<r>.pt``: the distributed plan, a single-process plan of the same model,
how many layers this rank fitted itself during the distributed plan, and the error every rank got
from a distributed plan after layer LAYER's weight was given a NaN.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

import mp_plugin as mp
import mp_plugin.spectrum.analysis as analysis


def model() -> nn.Module:
    """Linear layers of several shapes (same seed on every rank, as DDP replicas are)."""
    torch.manual_seed(0)
    widths = [(64, 96), (96, 96), (96, 128), (128, 64), (64, 64), (64, 48), (48, 32), (32, 16)]
    return nn.Sequential(*[nn.Linear(i, o) for i, o in widths])


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    fitted: list[int] = []
    real_fit_many = analysis.fit_many

    def counting_fit_many(weights, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        fitted.append(len(weights))
        return real_fit_many(weights, *args, **kwargs)

    analysis.fit_many = counting_fit_many
    shared = mp.plan(net, sparsity=0.6, pattern="unstructured", distributed=True)
    analysis.fit_many = real_fit_many
    alone = mp.plan(net, sparsity=0.6, pattern="unstructured")
    with torch.no_grad():
        net[int(sys.argv[2])].weight[0, 0] = float("nan")  # a layer only one rank fits
    try:
        mp.plan(net, sparsity=0.6, pattern="unstructured", distributed=True)
        error = None
    except mp.MPPluginError as exc:  # raised on every rank, not only on the one that fitted the layer
        error = type(exc).__name__
    torch.save(
        {
            "distributed": shared.to_dict(),
            "alone": alone.to_dict(),
            "fitted": sum(fitted),
            "world": dist.get_world_size(),
            "error": error,
        },
        f"{out}/rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
