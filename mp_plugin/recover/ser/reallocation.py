"""SER, sparsify–estimate–restore (Spectral Edge Reallocation), in four phases (ALGORITHM.md §2 items 4–5).

:class:`SpectralEdgeReallocation` runs over-prune → selection → restore →
frozen-mask fine-tuning, configured by :class:`SERConfig`; the phases, the two
expansions of "SER" in the authors' sources and the [D] choices they leave open
are described once, in the package docstring (:mod:`mp_plugin.recover.ser`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mp_plugin.errors import ConfigError, MPPluginError
from mp_plugin.masks.counts import check_sparsity, prune_target
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.masks.select import unstructured_mask
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan
from mp_plugin.recover.distill import DistillConfig, DistillResult, distill
from mp_plugin.recover.distill.evaluate import split_batch
from mp_plugin.recover.distill.loss import kd_loss

__all__ = ["SERConfig", "SERResult", "SpectralEdgeReallocation"]


def _selection_default() -> DistillConfig:
    # spec: AdamW, lr = 8 × 5e−5, min-lr ratio 0.25, one epoch (Hybrid code: 2); no weight decay on frozen entries
    return DistillConfig(
        epochs=1, optimizer="adamw", lr=4e-4, min_lr_ratio=0.25, weight_decay=0.0, alpha=0.5, allow_dense=True
    )


def _finetune_default() -> DistillConfig:
    # spec: SER keep-FT 1 epoch, SGD(0.9), lr 5e−5, label smoothing 0.1, grad-clip 1.0
    return DistillConfig(epochs=1, optimizer="sgd", lr=5e-5, weight_decay=1e-6, grad_clip=1.0)


@dataclass
class SERConfig:
    """Settings of :class:`SpectralEdgeReallocation`.

    Attributes:
        extra: over-prune to s + extra of the target weights (spec: 0.03), then restore ``extra``.
        budget_method: score of the over-prune, a ``plan`` method (``"seb"`` = |W|/w_ℓ).
        rho: restore priority ρ_ℓ: ``"inverse_w"`` (1/w_ℓ, default), ``"w"`` (w_ℓ) or ``"one"``.
        reservoir: ``"new"`` (entries pruned by this step) or ``"all"`` (every pruned entry).
        restore_value: ``"trained"`` (selection-phase value) or ``"dense"`` (pre-prune value).
        selection: optimiser/schedule/loss settings of the selection phase (``epochs``,
            ``max_steps``, ``lr``, ``alpha``, ``tau``, …; weight decay is forced to 0).
        logit_l2_weight: weight of mean((z_student − z_reference)²) in the selection loss.
        finetune: frozen-mask fine-tuning settings; None skips phase 4.
        plan_config: :class:`PlanConfig` for the SEB fit and layer selection.
        show_progress: tqdm bars.
    """

    extra: float = 0.03
    budget_method: str = "seb"
    rho: Literal["inverse_w", "w", "one"] = "inverse_w"
    reservoir: Literal["new", "all"] = "new"
    restore_value: Literal["trained", "dense"] = "trained"
    selection: DistillConfig = field(default_factory=_selection_default)
    logit_l2_weight: float = 1.0
    finetune: DistillConfig | None = field(default_factory=_finetune_default)
    plan_config: PlanConfig | None = None
    show_progress: bool = False

    def __post_init__(self) -> None:
        real = (int, float)
        if isinstance(self.extra, bool) or not isinstance(self.extra, real) or not 0 < self.extra < 1:
            raise ConfigError(f"extra must be a number in (0, 1), got {self.extra!r}")
        lw = self.logit_l2_weight
        if isinstance(lw, bool) or not isinstance(lw, real) or not 0 <= lw < math.inf:
            raise ConfigError(f"logit_l2_weight must be a finite number ≥ 0, got {lw!r}")
        if not isinstance(self.selection, DistillConfig):
            raise ConfigError(f"selection must be a DistillConfig, got {type(self.selection).__name__}")
        if self.finetune is not None and not isinstance(self.finetune, DistillConfig):
            raise ConfigError(f"finetune must be a DistillConfig or None, got {type(self.finetune).__name__}")
        if self.rho not in ("inverse_w", "w", "one"):
            raise MPPluginError(f"rho must be 'inverse_w', 'w' or 'one', got {self.rho!r}")
        if self.reservoir not in ("new", "all") or self.restore_value not in ("trained", "dense"):
            raise MPPluginError("reservoir must be 'new'/'all' and restore_value 'trained'/'dense'")


@dataclass
class SERResult:
    """What one SER step did.

    Attributes:
        sparsity: target s; over_sparsity: s + extra (as realised: exact counts / total).
        masks: final masks (``True`` = kept) of the target layers, by module name.
        layer_w: SEB weights w_ℓ; rho: the ρ_ℓ used.
        reservoir: |ℛ| per layer; restored: restored entries per layer.
        delta_mean: mean |Δw| over ℛ per layer after the selection phase.
        selection_steps / selection_loss: optimiser steps and (first, last) loss of phase 2.
        finetune: the fine-tuning :class:`DistillResult` (None when skipped).
        plan: the over-prune plan (its per-layer ``w``, fits and counts).
    """

    sparsity: float
    over_sparsity: float
    masks: dict[str, torch.Tensor]
    layer_w: dict[str, float]
    rho: dict[str, float]
    reservoir: dict[str, int]
    restored: dict[str, int]
    delta_mean: dict[str, float]
    selection_steps: int = 0
    selection_loss: tuple[float, float] = (float("nan"), float("nan"))
    finetune: DistillResult | None = None
    plan: PrunePlan | None = None

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of masked-out entries over the target layers."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(1, total)

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-layer table without the masks."""
        return {
            "sparsity": self.sparsity,
            "over_sparsity": self.over_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "selection_steps": self.selection_steps,
            "selection_loss": list(self.selection_loss),
            "layers": {
                n: {
                    "w": self.layer_w[n],
                    "rho": self.rho[n],
                    "reservoir": self.reservoir[n],
                    "restored": self.restored[n],
                    "delta_mean": self.delta_mean[n],
                }
                for n in self.masks
            },
        }


class SpectralEdgeReallocation:
    """SER: sparsify–estimate–restore, a.k.a. Spectral Edge Reallocation (see the module docstring).

    Example::

        ser = SpectralEdgeReallocation(SERConfig(extra=0.03))
        result = ser.run(model, 0.5, train_loader, teacher=dense_model)
        assert abs(result.achieved_sparsity - 0.5) < 1e-6

    Each phase is also a public method so that callers (and tests) can inspect
    the model between them.
    """

    def __init__(self, config: SERConfig | None = None) -> None:
        self.config = config or SERConfig()

    # ---------------------------------------------------------------- phase 1
    def overprune(self, model: nn.Module, sparsity: float) -> tuple[PrunePlan, dict[str, torch.Tensor], dict]:
        """Prune ``model`` in place to s + extra by global |W|/w_ℓ.

        Returns:
            (plan, over_masks, state): the plan at s + extra (per-layer ``w``), the masks
            after over-pruning (``True`` = kept) and a state dict for the next phases
            (``reservoir`` masks, ``before`` values of the reservoir, ``target`` total count).
        """
        cfg = self.config
        s = check_sparsity(sparsity)
        s_over = min(s + cfg.extra, 0.999)
        p = plan(model, s_over, "unstructured", cfg.budget_method, cfg.plan_config, show_progress=cfg.show_progress)
        modules = p.check_model(model)
        total = p.total_weights
        target_pruned = prune_target(s, total)
        over, reservoir, dense_vals = {}, {}, {}
        for lp in p.layers:
            w = modules[lp.name].weight
            was_zero = w.detach() == 0
            mask = unstructured_mask(w, lp.n_prune)
            over[lp.name] = mask
            res = ~mask if cfg.reservoir == "all" else (~mask & ~was_zero)
            reservoir[lp.name] = res
            dense_vals[lp.name] = w.detach()[res].clone()
        n_over = sum(int((~m).sum()) for m in over.values())
        n_restore = n_over - target_pruned
        n_res = sum(int(r.sum()) for r in reservoir.values())
        if n_restore < 0 or n_restore > n_res:
            raise MPPluginError(
                f"cannot restore {n_restore} entries from a reservoir of {n_res}: the model is already sparser "
                f"than the target s={s:.4f} (reservoir='{cfg.reservoir}')"
            )
        with torch.no_grad():  # every check passed: now prune
            for lp in p.layers:
                modules[lp.name].weight.masked_fill_(~over[lp.name], 0)
        state = {"reservoir": reservoir, "dense": dense_vals, "target_pruned": target_pruned, "n_restore": n_restore}
        return p, over, state

    # ---------------------------------------------------------------- phase 2
    def select(
        self,
        model: nn.Module,
        reservoir: dict[str, torch.Tensor],
        train_loader: Iterable,
        reference: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[dict[str, torch.Tensor], int, tuple[float, float]]:
        """Train only the reservoir entries; return (|Δw| per layer, steps, (first, last) loss).

        A gated phase of the one training loop (:func:`~mp_plugin.recover.distill.distill`
        with :meth:`MaskKeeper.gate`): every parameter except the target weights is frozen;
        inside the target weights gradients are multiplied by the reservoir mask, and AdamW
        runs without weight decay, so kept entries do not move at all. The model runs in eval mode
        (BatchNorm running statistics are not updated, dropout is off). ``reference`` (the pre-prune model
        or the dense teacher) gives the KD/logit-matching targets; without it the
        loss is label-smoothed CE.
        """
        cfg = self.config.selection.replace(
            optimizer="adamw", weight_decay=0.0, grad_clip=None, bf16=False, seed=None, eval_mode=True, allow_dense=True
        )
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        if reference is not None:
            reference.to(dev).eval()  # run under torch.no_grad() only
        l2 = self.config.logit_l2_weight
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight for name in reservoir}
        before = {name: w.detach().clone() for name, w in weights.items()}
        losses: list[float] = []

        def loss(net: nn.Module, batch: Any) -> torch.Tensor:
            x, y = split_batch(batch)
            with torch.no_grad():
                ref = reference(x) if reference is not None else None
            out = net(x)
            alpha = 1.0 if y is None else cfg.alpha if ref is not None else 0.0
            value = kd_loss(out, ref, y, alpha, cfg.tau, cfg.label_smoothing)
            if ref is not None and l2:
                value = value + l2 * (out.float() - ref.float()).pow(2).mean()
            return value

        with MaskKeeper.gate(model, reservoir) as keeper:  # only reservoir entries move; model in eval mode
            result = distill(
                model,
                None,
                train_loader,
                cfg,
                keeper=keeper,
                device=dev,
                show_progress=False,
                loss=loss,
                callbacks=[lambda _step, _model, metrics: losses.append(metrics["loss"])],
            )
        step = result.steps
        delta = {name: (w.detach() - before[name]).abs() * reservoir[name] for name, w in weights.items()}
        first = sum(losses[:3]) / max(1, len(losses[:3]))
        last = sum(losses[-3:]) / max(1, len(losses[-3:]))
        return delta, step, (first, last)

    # ---------------------------------------------------------------- phase 3
    def rho_values(self, p: PrunePlan) -> dict[str, float]:
        """ρ_ℓ per layer from the plan's SEB weights w_ℓ."""
        out = {}
        for lp in p.layers:
            w = float(lp.w) if math.isfinite(lp.w) and lp.w > 0 else 1.0
            out[lp.name] = 1.0 / w if self.config.rho == "inverse_w" else w if self.config.rho == "w" else 1.0
        return out

    @torch.no_grad()
    def restore(
        self,
        model: nn.Module,
        over_masks: dict[str, torch.Tensor],
        state: dict,
        delta: dict[str, torch.Tensor],
        rho: dict[str, float],
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Restore the top |Δw|·ρ_ℓ reservoir entries to exactly the target sparsity; zero the rest.

        Returns:
            (masks, restored counts per layer). Ties are broken by layer order, then position.
        """
        names = list(over_masks)
        reservoir = state["reservoir"]
        k = int(state["n_restore"])
        scores = torch.cat(
            [torch.where(reservoir[n], delta[n].float() * rho[n], -1.0).reshape(-1).cpu() for n in names]
        )
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if k > 0:
            order = torch.sort(scores, descending=True, stable=True).indices[:k]
            chosen[order] = True
        masks, restored, start = {}, {}, 0
        modules = dict(model.named_modules())
        for n in names:
            numel = over_masks[n].numel()
            pick = chosen[start : start + numel].reshape(over_masks[n].shape).to(over_masks[n].device)
            start += numel
            w = modules[n].weight
            if self.config.restore_value == "dense":
                vals = torch.zeros_like(w)
                vals[reservoir[n]] = state["dense"][n].to(w.dtype)
                # an entry pruned before this step has no dense value (0): it keeps its trained value
                w.copy_(torch.where(pick & (vals != 0), vals, w))
            mask = over_masks[n] | pick
            w.masked_fill_(~mask, 0)
            masks[n] = mask
            restored[n] = int(pick.sum())
        pruned = sum(int((~m).sum()) for m in masks.values())
        if pruned != state["target_pruned"]:
            raise MPPluginError(f"SER restore left {pruned} pruned entries, expected {state['target_pruned']}")
        return masks, restored

    # ---------------------------------------------------------------- phase 4
    def finetune(
        self,
        model: nn.Module,
        masks: dict[str, torch.Tensor],
        train_loader: Iterable,
        teacher: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> DistillResult | None:
        """Frozen-mask fine-tuning with :func:`mp_plugin.recover.distill.distill` (None when configured off)."""
        if self.config.finetune is None:
            return None
        keeper = MaskKeeper(model, masks)
        return distill(
            model,
            teacher,
            train_loader,
            self.config.finetune,
            keeper=keeper,
            device=device,
            show_progress=self.config.show_progress,
        )

    # ---------------------------------------------------------------- all
    def run(
        self,
        model: nn.Module,
        sparsity: float,
        train_loader: Iterable,
        teacher: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> SERResult:
        """All four phases on ``model`` (in place) to exactly ``sparsity`` over the target layers.

        Args:
            model: the model (dense or already pruned below ``sparsity``).
            sparsity: target global fraction s of the target layers' weights.
            train_loader: batches ``(images, labels)`` (labels optional with a teacher).
            teacher: the dense model (selection reference and fine-tuning teacher);
                without one the selection reference is a frozen copy of ``model`` as it
                was before over-pruning.
            device: where to train.
        """
        reference = teacher if teacher is not None else copy.deepcopy(model).eval()
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        teacher_flags = {m: m.training for m in teacher.modules()} if teacher is not None else {}
        try:
            p, over, state = self.overprune(model, sparsity)
            delta, steps, losses = self.select(model, state["reservoir"], train_loader, reference, device)
            rho = self.rho_values(p)
            masks, restored = self.restore(model, over, state, delta, rho)
            ft = self.finetune(model, masks, train_loader, teacher, device)
        except BaseException:  # all or nothing: a failed step leaves the model as it was
            model.load_state_dict(saved)
            raise
        finally:  # the selection and fine-tuning run the teacher in eval mode: its flags come back
            for m, flag in teacher_flags.items():
                m.training = flag
        total = p.total_weights
        return SERResult(
            sparsity=float(sparsity),
            over_sparsity=sum(int((~m).sum()) for m in over.values()) / total,
            masks=masks,
            layer_w={lp.name: float(lp.w) for lp in p.layers},
            rho=rho,
            reservoir={n: int(r.sum()) for n, r in state["reservoir"].items()},
            restored=restored,
            delta_mean={
                n: float(delta[n][state["reservoir"][n]].mean()) if int(state["reservoir"][n].sum()) else 0.0
                for n in delta
            },
            selection_steps=steps,
            selection_loss=losses,
            finetune=ft,
            plan=p,
        )
