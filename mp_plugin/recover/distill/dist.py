"""torch.distributed plumbing for ``torchrun``: init from the environment, DDP, samplers, rank-0 I/O.

Under ``torchrun`` every process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
in its environment. :func:`init_distributed` reads them, picks NCCL on CUDA and
gloo on CPU, and returns a :class:`DistContext`. Without those variables (or with
WORLD_SIZE=1) it returns a single-process context and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = ["DistContext", "init_distributed", "unwrap"]


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank, world_size, local_rank: as set by torchrun (0, 1, 0 when not distributed).
        device: this process's device.
        backend: ``"nccl"``, ``"gloo"`` or None when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0

    def sampler(self, dataset: Any, shuffle: bool) -> Any:
        """A ``DistributedSampler`` over ``dataset`` under DDP, else None."""
        if not self.enabled:
            return None
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` under DDP (parameters broadcast from rank 0), else ``model``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over processes (in place under DDP; unchanged otherwise)."""
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics, …) to every rank (no-op when single).

        DDP keeps parameters identical, but each rank updates its buffers on its own
        shard after the last broadcast; this makes the final models identical.
        """
        if self.enabled:
            for buf in model.buffers():
                torch_dist.broadcast(buf, src=0)

    def barrier(self) -> None:
        """Wait for every process (no-op when single)."""
        if self.enabled:
            torch_dist.barrier()

    @classmethod
    def current(cls, device: torch.device | None = None) -> DistContext:
        """The context of an already initialised process group (or single-process)."""
        if torch_dist.is_available() and torch_dist.is_initialized():
            return cls(
                rank=torch_dist.get_rank(),
                world_size=torch_dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                device=device,
                backend=str(torch_dist.get_backend()),
            )
        return cls(device=device)


def init_distributed(backend: str | None = None, device: str | None = None) -> DistContext:
    """Initialise ``torch.distributed`` from torchrun's environment variables.

    Args:
        backend: force ``"gloo"``/``"nccl"`` (default: NCCL when CUDA is available, else gloo).
        device: force ``"cpu"``/``"cuda"`` (default: CUDA when available).

    Returns:
        A :class:`DistContext`; single-process when WORLD_SIZE is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistContext(device=dev)
    chosen = backend or ("nccl" if use_cuda else "gloo")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=chosen)
    return DistContext(
        rank=torch_dist.get_rank(),
        world_size=torch_dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=chosen,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/DataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)
