"""Checkpoints of a distillation run that keep everything pruning decided.

A checkpoint (``torch.save`` dict) holds the student's state_dict, the masks
(:meth:`MaskKeeper.state_dict`), the plan as JSON text plus its fingerprint (the
plan carries the channel permutation ``apply(..., permute=...)`` folded in,
``plan.applied["permutation"]``; its consumer → order map is also stored on its
own for the resume check), the optimiser, scheduler and RNG states, and the
step/epoch counters. Nothing is read from or written to attributes of the model,
so a DDP- or ``torch.compile``-wrapped student checkpoints the same way. Resuming
with a different plan, different masks or a different permutation raises
:class:`~mp_plugin.errors.PlanMismatchError` before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError, PlanMismatchError
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.planning.plan import PrunePlan

__all__ = ["plan_fingerprint", "save_checkpoint", "read_checkpoint", "restore_checkpoint", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


def plan_fingerprint(plan: PrunePlan | None) -> str | None:
    """SHA-256 over what a plan decides (layers, shapes, patterns, counts, sparsity, method); None for no plan."""
    if plan is None:
        return None
    key = {
        "sparsity": round(float(plan.sparsity), 12),
        "pattern": plan.pattern,
        "method": plan.method,
        "layers": [[lp.name, list(lp.weight_shape), lp.pattern, int(lp.n_prune)] for lp in plan.layers],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _orders(perms: dict) -> dict[str, list[int]]:
    return {k: list(map(int, v)) for k, v in dict(perms).items()}


def _masks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    """None when equal, else a sentence saying where they differ."""
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        return f"masked layers differ ({len(diff)} layer(s), e.g. {diff[:3]})"
    for name in a:
        if a[name].shape != b[name].shape or not torch.equal(a[name].cpu().bool(), b[name].cpu().bool()):
            return f"mask of layer {name!r} differs"
    return None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    keeper: MaskKeeper,
    plan: PrunePlan | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    epoch: int = 0,
    config: dict | None = None,
    extra: dict | None = None,
    epoch_rng: torch.Tensor | None = None,
) -> Path:
    """Write a resumable checkpoint to ``path`` (and ``plan.json`` beside it when a plan is given).

    ``model`` may be wrapped (DDP, ``torch.compile``): the state_dict of the model inside
    is saved, so the checkpoint loads into the plain architecture.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = None if plan is None else plan.permutation
    state = {
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()},
        "masks": keeper.state_dict()["masks"],
        "plan_json": None if plan is None else json.dumps(plan.to_dict(), default=str),
        "plan_fingerprint": plan_fingerprint(plan),
        "permutations": None if record is None else _orders(record["permutations"]),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "epoch_rng": epoch_rng,  # the CPU generator as the epoch's loader iterator was made (its shuffle)
        "cuda_rng": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
        "step": int(step),
        "epoch": int(epoch),
        "config": config or {},
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    if plan is not None:
        plan.save(path.parent / "plan.json")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict written by :func:`save_checkpoint` (on CPU)."""
    path = Path(path)
    if not path.exists():
        raise MPPluginError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise MPPluginError(f"checkpoint {path} is a directory: give the file, e.g. {path / 'last.pt'}")
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "masks" not in state:
        raise MPPluginError(f"{path} is not an mp-plugin distillation checkpoint")
    return state


def restore_checkpoint(
    state: dict[str, Any],
    model: nn.Module,
    keeper: MaskKeeper,
    plan: PrunePlan | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> PrunePlan | None:
    """Load ``state`` into model/keeper/optimizer/scheduler after checking it belongs to this run.

    Checks, in order (each raises :class:`PlanMismatchError`): the plan fingerprint
    (when both sides have a plan), the masks (when ``keeper`` already holds masks),
    the channel permutation (when both ``plan`` and the checkpoint record one).

    Returns:
        The checkpoint's plan (or ``plan`` when the checkpoint has none), with its
        channel permutation record. A checkpoint of the first format, whose fold record
        was stored beside the plan (``"permutation_record"``), gives it back inside the plan.
    """
    ck_fp = state.get("plan_fingerprint")
    fp = plan_fingerprint(plan)
    if fp is not None and ck_fp is not None and fp != ck_fp:
        raise PlanMismatchError(
            "cannot resume: the checkpoint was made with a different prune plan "
            f"(fingerprint {ck_fp[:12]}… vs this run's {fp[:12]}…)"
        )
    if fp is not None and ck_fp is None:
        raise PlanMismatchError("cannot resume: this run has a plan but the checkpoint was written without one")
    if keeper.masks:
        why = _masks_equal(keeper.masks, state["masks"])
        if why:
            raise PlanMismatchError(f"cannot resume: the checkpoint's masks belong to a different pruning ({why})")
    ck_perm = state.get("permutations")
    perm = None if plan is None else plan.permutation
    if perm is not None and ck_perm is not None and _orders(perm["permutations"]) != ck_perm:
        raise PlanMismatchError("cannot resume: the checkpoint records a different channel permutation")
    missing, unexpected = unwrap_model(model).load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise PlanMismatchError(
            f"checkpoint does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    keeper.load_state_dict({"masks": state["masks"]})
    keeper.apply()
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    out = PrunePlan.from_dict(json.loads(state["plan_json"])) if state.get("plan_json") else plan
    old_record = state.get("permutation_record")  # the first format kept the fold record beside the plan
    if out is not None and old_record and out.permutation is None:
        out.applied["permutation"] = {"permutations": old_record["permutations"], "folds": old_record["folds"]}
    return out
