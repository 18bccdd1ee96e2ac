"""Join open-ended couplings of sibling modules whose common parent does not trace.

When a parent (e.g. a Hugging Face ``BertLayer``) cannot be traced, its children
are traced one by one. A child may then end in an open coupling (producers whose
channels leave as the child's output, e.g. ``intermediate.dense → act``) and
another may start with one (its first input feeds consumers, e.g. ``output.dense``).
One forward pass on the example input shows which output tensor object is passed
on as which input. Matching pairs are joined into one coupling, which is kept
only after the parent's output is checked to be unchanged on that input, because
the parent's untraced code could also use the tensor elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mp_plugin.permute.graph import Coupling

__all__ = ["link_partials"]


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def link_partials(
    model: nn.Module, partials: list[Coupling], example: Any, run: Callable[[nn.Module, Any], Any]
) -> list[Coupling]:
    """Return joined couplings (each with ``verify_module`` set) found by one forward pass.

    Args:
        model: the model (put in eval mode by the caller).
        partials: open couplings from :func:`find_couplings`.
        example: the example input; ``run(model, example)`` calls the model.
    """
    outs = [p for p in partials if p.open_output]
    ins = [p for p in partials if p.open_input is not None]
    if not outs or not ins:
        return []
    seen_out: dict[str, list[Any]] = {p.region: [] for p in outs}
    seen_in: dict[str, list[Any]] = {p.region: [] for p in ins}
    handles = []
    for p in outs:

        def out_hook(_m: nn.Module, _a: tuple, o: Any, key: str = p.region) -> None:
            seen_out[key].append(o)

        handles.append(model.get_submodule(p.region).register_forward_hook(out_hook))
    for p in ins:

        def in_hook(_m: nn.Module, a: tuple, kw: dict, key: str = p.region, name: str = str(p.open_input)) -> None:
            seen_in[key].append(a[0] if a else kw.get(name))

        handles.append(model.get_submodule(p.region).register_forward_pre_hook(in_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run(model, example)
    finally:
        for h in handles:
            h.remove()
    linked: list[Coupling] = []
    used: set[str] = set()
    for a in outs:
        if len(seen_out[a.region]) != 1 or not isinstance(seen_out[a.region][0], torch.Tensor):
            continue
        tensor = seen_out[a.region][0]
        bs = [b for b in ins if len(seen_in[b.region]) == 1 and seen_in[b.region][0] is tensor]
        if not bs or any(b.region in used for b in bs):
            continue
        if any(b.channels != a.channels or b.axis != a.axis for b in bs):
            continue
        used.update(b.region for b in bs)
        parent = _common_prefix([a.region] + [b.region for b in bs])
        linked.append(
            Coupling(
                channels=a.channels,
                axis=a.axis,
                producers=list(a.producers),
                ops=list(a.ops) + [op for b in bs for op in b.ops],
                params=list(a.params) + [pr for b in bs for pr in b.params],
                consumers=[c for b in bs for c in b.consumers],
                region=parent,
                verify_module=parent,
            )
        )
    return linked
