"""Knowledge distillation from the frozen dense teacher to the pruned student (ALGORITHM.md §4).

* :class:`DistillConfig` — α, τ, ε, epochs, optimiser and schedule; ``for_family("vit"|"convnext"|"resnet")``.
* :func:`kd_loss` — (1−α)·label-smoothed CE + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)).
* :func:`param_groups`, :func:`build_optimizer`, :func:`warmup_cosine` — no decay on 1-D/norm/tokens.
* :func:`make_loaders` — timm's data pipeline over an ImageFolder/ImageNet-layout directory.
* :func:`distill` — the loop: masks exact after every step, checkpoint/resume, DDP under torchrun.
* :func:`init_distributed` / :class:`DistContext` — ``torch.distributed`` from torchrun's environment.
"""

from __future__ import annotations

from .checkpoint import plan_fingerprint, read_checkpoint, restore_checkpoint, save_checkpoint
from .config import FAMILY_DEFAULTS, DistillConfig
from .data import DataConfig, Loaders, make_loaders, model_num_classes
from .dist import DistContext, init_distributed, unwrap
from .errors import DataMismatchError, DenseStudentError, NonFiniteLossError
from .loop import DistillResult, distill, evaluate, masks_from_plan
from .loss import kd_loss, kd_term
from .optim import build_optimizer, param_groups, warmup_cosine

__all__ = [
    "FAMILY_DEFAULTS",
    "DataConfig",
    "DataMismatchError",
    "DenseStudentError",
    "DistContext",
    "DistillConfig",
    "DistillResult",
    "Loaders",
    "NonFiniteLossError",
    "build_optimizer",
    "distill",
    "evaluate",
    "init_distributed",
    "kd_loss",
    "kd_term",
    "make_loaders",
    "masks_from_plan",
    "model_num_classes",
    "param_groups",
    "plan_fingerprint",
    "read_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
    "unwrap",
    "warmup_cosine",
]
