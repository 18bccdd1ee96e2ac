"""Knowledge distillation from the frozen dense teacher to the pruned student (ALGORITHM.md §4).

* :class:`DistillConfig` — α, τ, ε, epochs, optimiser and schedule; ``for_family("vit"|"convnext"|"resnet")``.
* :func:`kd_loss` — (1−α)·label-smoothed CE + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)).
* :func:`param_groups`, :func:`build_optimizer`, :func:`warmup_cosine` — no decay on 1-D/norm/tokens.
* loaders: :func:`mp_plugin.integrations.timm.make_loaders` (timm's data pipeline over image folders) or your own.
* :func:`distill` — the one training loop (KD, CE or a custom loss; hooks; masks kept by a
  :class:`~mp_plugin.masks.keep.MaskKeeper`), checkpoint/resume, DDP under torchrun.
* :func:`init_distributed` / :class:`DistContext` — ``torch.distributed`` from torchrun's environment.
"""

from __future__ import annotations

from mp_plugin.recover.distill.checkpoint import plan_fingerprint, read_checkpoint, restore_checkpoint, save_checkpoint
from mp_plugin.recover.distill.config import FAMILY_DEFAULTS, DistillConfig
from mp_plugin.recover.distill.data import DataConfig, Loaders, model_num_classes
from mp_plugin.recover.distill.dist import DistContext, init_distributed, unwrap
from mp_plugin.recover.distill.errors import DataMismatchError, DenseStudentError, NonFiniteLossError
from mp_plugin.recover.distill.loop import DistillResult, distill, evaluate, masks_from_plan
from mp_plugin.recover.distill.loss import kd_loss, kd_term
from mp_plugin.recover.distill.optim import build_optimizer, param_groups, warmup_cosine

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
