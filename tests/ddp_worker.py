"""Run under ``torchrun --nproc_per_node 2``: distil a pruned SmallCNN with DDP (gloo, CPU).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py DATA OUT``.
Every rank writes ``OUT/rank<r>.pt`` with its final state_dict, masks and the sample indices it saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_data import pruned_cnn  # noqa: E402
from mp_plugin.integrations.timm import make_loaders  # noqa: E402

from mp_plugin.masks.keep import MaskKeeper  # noqa: E402
from mp_plugin.recover.distill import DataConfig, DistillConfig, distill, init_distributed  # noqa: E402


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(device="cpu")
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    student, teacher, plan = pruned_cnn(0.5)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    loaders = make_loaders(data, student, 6, DataConfig(input_size=(3, 32, 32), no_aug=True), dist=ctx)
    seen = list(iter(loaders.train_sampler))
    result = distill(
        student,
        teacher,
        loaders.train,
        DistillConfig(epochs=2, max_steps=4, lr=5e-3),
        val_loader=loaders.val,
        plan=plan,
        dist=ctx,
        show_progress=False,
    )
    keeper = MaskKeeper(student)
    torch.save(
        {
            "state": student.state_dict(),
            "initial": initial,
            "masks": keeper.state_dict()["masks"],
            "seen": seen,
            "steps": result.steps,
            "val": result.val,
        },
        Path(out) / f"rank{ctx.rank}.pt",
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
