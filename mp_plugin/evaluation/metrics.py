"""Evaluation helpers shared by the main job, benchmarks and tests.

Two kinds of number are reported everywhere: a task metric (top-1, linear-probe
accuracy) and output fidelity to the dense model (top-1 agreement, KL, cosine
of logits or embeddings), because a re-fitted probe can hide damage that
fidelity shows. Every helper runs batched under ``torch.no_grad`` with a tqdm
bar and fixed seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.progress import progress

__all__ = [
    "Fidelity",
    "batched_outputs",
    "output_fidelity",
    "top1_accuracy",
    "linear_probe_accuracy",
    "embedding_retention",
]


@torch.no_grad()
def batched_outputs(
    model: nn.Module | Callable, x: torch.Tensor, batch_size: int = 32, desc: str = "forward", show: bool = False
) -> torch.Tensor:
    """Run ``model`` over ``x`` (N, …) in batches; returns (N, …) float32 outputs on CPU."""
    if isinstance(model, nn.Module):
        model.eval()
    outs = []
    for i in progress(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not show):
        outs.append(model(x[i : i + batch_size]).float().cpu())
    return torch.cat(outs)


@dataclass
class Fidelity:
    """How close pruned outputs stay to dense outputs on the same inputs.

    Attributes:
        top1_agreement: fraction of samples with the same arg-max (classifiers).
        kl: mean KL(softmax(dense) ‖ softmax(pruned)) in nats.
        cosine: mean cosine similarity of the output vectors.
        max_abs: largest |dense − pruned| entry.
    """

    top1_agreement: float
    kl: float
    cosine: float
    max_abs: float

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def output_fidelity(dense_out: torch.Tensor, pruned_out: torch.Tensor) -> Fidelity:
    """Compare (N, K) dense and pruned outputs (logits or embeddings)."""
    if dense_out.shape != pruned_out.shape:
        raise ValueError(f"output shapes differ: {tuple(dense_out.shape)} vs {tuple(pruned_out.shape)}")
    d, p = dense_out.float(), pruned_out.float()
    agree = float((d.argmax(-1) == p.argmax(-1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(p, -1), F.log_softmax(d, -1), log_target=True, reduction="batchmean"))
    cos = float(F.cosine_similarity(d, p, dim=-1).mean())
    return Fidelity(agree, kl, cos, float((d - p).abs().max()))


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], show: bool = False) -> float:
    """Top-1 accuracy of a classifier over ``(x, y)`` batches."""
    model.eval()
    correct = total = 0
    for x, y in progress(batches, desc="top-1", unit="batch", disable=not show):
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("no samples to evaluate")
    return correct / total


def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-3,
    steps: int = 200,
    seed: int = 0,
) -> float:
    """Accuracy of a multinomial logistic-regression probe fitted on frozen features.

    Features are standardised with the training statistics; the probe is fitted
    full-batch with L-BFGS (deterministic for a given seed).
    """
    torch.manual_seed(seed)
    mu, sd = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    xtr, xte = (train_feats - mu) / sd, (test_feats - mu) / sd
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = nn.Linear(xtr.shape[1], classes, dtype=torch.float64)
    xtr, xte = xtr.double(), xte.double()
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(xtr), train_labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((probe(xte).argmax(-1) == test_labels).float().mean())


def embedding_retention(dense_emb: torch.Tensor, pruned_emb: torch.Tensor) -> dict[str, float]:
    """Mean cosine of paired embeddings and the agreement of nearest neighbours (top-1) within the set."""
    d = F.normalize(dense_emb.float(), dim=-1)
    p = F.normalize(pruned_emb.float(), dim=-1)
    cos = float((d * p).sum(-1).mean())
    sim_d, sim_p = d @ d.T, p @ p.T
    sim_d.fill_diagonal_(-2.0)
    sim_p.fill_diagonal_(-2.0)
    nn_agree = float((sim_d.argmax(-1) == sim_p.argmax(-1)).float().mean())
    return {"cosine": cos, "neighbour_agreement": nn_agree}
