"""Keeping masks while a model trains: the one mechanism every training phase uses.

A :class:`MaskKeeper` holds one boolean mask per Linear/Conv weight (``True`` = free to
train, ``False`` = held). Held entries are put back after every optimiser step:

* ``hold="zero"`` (default): held entries are pruned weights and stay exactly zero
  (frozen-mask fine-tuning, distillation, the data-free MP shrink step);
* ``hold="values"``: held entries keep the values they had when the keeper was made
  (a gated phase such as SER selection, where only a reservoir of entries may move).

With ``zero_grads=True`` the keeper also multiplies each weight's gradient by its mask
(a tensor hook, before the gradient reaches ``.grad``), so momentum and Adam moments
never see a held entry. :meth:`MaskKeeper.gate` is the context for a gated phase: it
freezes every other parameter and restores the ``requires_grad`` flags on exit.

Framework adapters that own a mask (``torch.ao.pruning``'s FakeSparsity) read their
masks from a keeper too (``mp_plugin.integrations.torch_ao_pruner``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from mp_plugin.errors import ConfigError, PlanMismatchError

__all__ = ["MaskKeeper", "prunable_weights"]

Hold = Literal["zero", "values"]


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Linear/Conv weights by module name, a shared weight listed once (first name)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        out[name] = weight
    return out


class MaskKeeper:
    """Keep masked weights fixed (at zero, or at their values) while a model trains.

    The model stays an ordinary ``nn.Module``: masks live in this object (and in
    its :meth:`state_dict`), never as parametrizations or extra model state.

    Args:
        model: the model.
        masks: ``{module name: bool mask shaped like its weight}`` (``True`` = free,
            ``False`` = held). ``None`` derives masks from the current exact zeros of
            every Linear/Conv weight that has any.
        zero_grads: also multiply each masked weight's gradient by its mask (hooks
            registered by :meth:`attach`).
        hold: ``"zero"`` (held entries are pruned: exactly zero) or ``"values"`` (held
            entries keep their values from construction time).

    Example::

        keeper = MaskKeeper(model).attach(optimizer)   # re-zero after every step
        ...
        torch.save({"model": model.state_dict(), "masks": keeper.state_dict()}, path)
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        zero_grads: bool = False,
        hold: Hold = "zero",
    ) -> None:
        if hold not in ("zero", "values"):
            raise ConfigError(f"hold must be 'zero' or 'values', got {hold!r}")
        self.model = model
        self.zero_grads = bool(zero_grads)
        self.hold = hold
        self._weights = prunable_weights(model)
        self._handles: list[Any] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._held: dict[str, torch.Tensor] = {}
        if masks is None:
            for name, weight in self._weights.items():
                mask = weight.detach() != 0
                if not bool(mask.all()):
                    self.masks[name] = mask
        else:
            self.load_state_dict({"masks": dict(masks)})
        if hold == "values":
            self._held = {name: self.weight(name).detach().clone() for name in self.masks}

    def weight(self, name: str) -> torch.Tensor:
        """The current weight of module ``name``, looked up by name each time (a replaced module or weight is found)."""
        try:
            weight = getattr(self.model.get_submodule(name), "weight", None)
        except AttributeError:
            weight = None
        if not isinstance(weight, torch.Tensor):
            raise KeyError(f"the model has no Linear/Conv weight named {name!r}")
        return weight

    _weight = weight  # the name older callers use

    def _mask_for(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``name``'s mask on ``weight``'s (or its gradient's) device: a model moved after the keeper was made (``.to("cuda")``)
        takes its masks (and held values) along on first use."""
        mask = self.masks[name]
        if mask.device != weight.device:
            mask = self.masks[name] = mask.to(weight.device)
        held = self._held.get(name)
        if held is not None and held.device != weight.device:  # moved on its own: load_state_dict moves masks only
            self._held[name] = held.to(weight.device)
        return mask

    @torch.no_grad()
    def apply(self) -> None:
        """Put every held entry back (zero, or its held value), in place."""
        for name in self.masks:
            weight = self.weight(name)
            mask = self._mask_for(name, weight)
            if self.hold == "values":
                weight.copy_(torch.where(mask, weight, self._held[name].to(weight.dtype)))
            else:
                weight.masked_fill_(~mask, 0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Multiply every masked weight's ``.grad`` by its mask, in place (for hand-written loops)."""
        for name in self.masks:
            weight = self.weight(name)
            if weight.grad is not None:
                weight.grad.mul_(self._mask_for(name, weight))

    def _gate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._mask_for(name, grad).to(grad.dtype)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply()

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> MaskKeeper:
        """Put held entries back after every ``optimizer.step()`` (and gate gradients when
        ``zero_grads``); returns ``self``. ``optimizer=None`` registers only the gradient hooks."""
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if self.zero_grads:
            for name in self.masks:
                weight = self.weight(name)
                if weight.requires_grad:  # the mask is looked up per call: it follows a later .to(device/dtype)
                    self._handles.append(weight.register_hook(lambda g, name=name: self._gate(name, g)))
        self.apply()
        return self

    def detach(self, since: int = 0) -> None:
        """Remove the hooks registered by :meth:`attach`: all of them, or those after the first ``since``.

        ``since`` is :attr:`hook_count` read before an ``attach`` of one's own, so a caller
        (``distill``) removes only its hooks and leaves a keeper attached to the user's optimizer attached.
        """
        for handle in self._handles[since:]:
            handle.remove()
        del self._handles[since:]

    @property
    def hook_count(self) -> int:
        """How many hooks :meth:`attach` has registered so far (see :meth:`detach`)."""
        return len(self._handles)

    @classmethod
    @contextmanager
    def gate(cls, model: nn.Module, gates: Mapping[str, torch.Tensor]) -> Iterator[MaskKeeper]:
        """A gated phase: only the ``True`` entries of ``gates`` (per weight) may change.

        Every parameter of ``model`` is frozen except the gated weights; inside those,
        gradients are masked and held entries keep their values (``hold="values"``,
        ``zero_grads=True``). Attach the yielded keeper to the optimizer. On exit the
        hooks are removed and every ``requires_grad`` flag is restored.
        """
        saved = {n: p.requires_grad for n, p in model.named_parameters()}
        keeper = None
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            keeper = cls(model, gates, zero_grads=True, hold="values")
            for name in keeper.masks:
                keeper.weight(name).requires_grad_(True)
            yield keeper
        finally:
            if keeper is not None:
                keeper.detach()
            for n, p in model.named_parameters():
                p.requires_grad_(saved.get(n, p.requires_grad))

    @property
    def sparsity(self) -> float:
        """Fraction of held (``False``) entries over the masked layers."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0

    def measured_sparsity(self) -> float:
        """Fraction of exact zeros in the masked layers' weights (measured, not read from the masks)."""
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(int((self.weight(name).detach() == 0).sum()) for name in self.masks)
        return zeros / total if total else 0.0

    def violations(self) -> int:
        """Held entries that are not at their held value (non-zero for ``hold="zero"``); 0 when kept."""
        count = 0
        for name in self.masks:
            weight = self.weight(name).detach()
            mask = self._mask_for(name, weight)
            if self.hold == "values":
                count += int((weight[~mask] != self._held[name].to(weight.dtype)[~mask]).sum())
            else:
                count += int((weight[~mask] != 0).sum())
        return count

    def state_dict(self) -> dict[str, Any]:
        """``{"masks": {name: bool CPU tensor}}`` for checkpoints."""
        return {"masks": {name: m.detach().cpu().clone() for name, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load masks written by :meth:`state_dict` (moved to each weight's device; shapes checked)."""
        masks = state.get("masks", state)
        new: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            weight = self.weight(name)
            if tuple(mask.shape) != tuple(weight.shape):
                raise PlanMismatchError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}"
                )
            new[name] = mask.to(device=weight.device, dtype=torch.bool)
        self.masks = new
        if self.hold == "values" and self._held:  # masks loaded later hold the values they have now
            self._held = {n: self._held.get(n, self.weight(n).detach().clone()) for n in new}
