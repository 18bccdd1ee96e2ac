"""The distillation loss: label-smoothed cross-entropy plus temperature-scaled KL to the teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "kd_term"]


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), averaged over the batch.

    Args:
        student_logits, teacher_logits: (B, K) logits (any float dtype; computed in float32).
        tau: temperature τ > 0.

    Returns:
        A scalar tensor (nats). The τ² factor keeps gradient magnitudes independent of τ.
    """
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * tau**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    alpha: float = 0.5,
    tau: float = 2.0,
    eps: float = 0.1,
) -> torch.Tensor:
    """(1−α)·CE_ε(student, targets) + α·τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)).

    Args:
        student_logits: (B, K).
        teacher_logits: (B, K), or None (then α must be 0: plain label-smoothed CE).
        targets: (B,) int64 class indices, or None (then α must be 1: pure distillation).
        alpha: KD weight α ∈ [0, 1].
        tau: temperature τ.
        eps: label smoothing ε of the CE term.

    Returns:
        Scalar loss (nats), float32.
    """
    if teacher_logits is None and alpha > 0:
        raise ValueError("kd_loss: alpha > 0 needs teacher logits")
    if targets is None and alpha < 1:
        raise ValueError("kd_loss: alpha < 1 needs targets")
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits.float(), targets, label_smoothing=eps)
    if alpha > 0:
        loss = loss + alpha * kd_term(student_logits, teacher_logits, tau)
    return loss
