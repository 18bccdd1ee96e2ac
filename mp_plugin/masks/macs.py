"""Multiply–accumulate (MAC) accounting: dense, k:n, and whatever a patched model really runs.

:func:`count_macs` runs the model once under ``torch.utils.flop_counter.FlopCounterMode``
and reads the matmul/conv FLOPs per module (1 MAC = 2 FLOPs). Attention computed by
``F.scaled_dot_product_attention`` is counted by a small function mode as well, because
FlopCounterMode has no formula for the CPU kernel. A k:n layer is counted at k/n of
its dense MACs — only when its weight really satisfies the pattern. Because MACs are
measured on an actual forward, a token-merging (ToMe) patched model is measured with
its reduced token counts: pass any callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from mp_plugin.layers.discovery import LayerSelection, find_target_layers
from mp_plugin.layers.patterns import DEPLOYABLE_KN, Pattern
from mp_plugin.masks.select import check_nm

__all__ = ["LayerMacs", "MacCount", "count_macs", "mac_table", "sparse_factor"]


@dataclass
class LayerMacs:
    """MACs of one target layer in one forward pass.

    Attributes:
        name: qualified module name. dense: MACs with every weight multiplied.
        pattern: the k:n pattern its weight satisfies and is counted at ("dense" if none).
        sparse: MACs counted at k/n (= dense when the pattern is dense).
    """

    name: str
    dense: int
    pattern: str
    sparse: float


@dataclass
class MacCount:
    """MACs of one forward pass.

    Attributes:
        dense: all matmul/conv/attention MACs with dense weights.
        sparse: the same with each satisfied k:n layer counted at k/n.
        attention: MACs inside scaled_dot_product_attention (part of ``dense``).
        layers: per target layer breakdown.
        input_desc: the input shapes measured.
    """

    dense: int
    sparse: float
    attention: int
    layers: list[LayerMacs] = field(default_factory=list)
    input_desc: str = ""

    @property
    def saved_fraction(self) -> float:
        """1 − sparse/dense."""
        return 1.0 - self.sparse / self.dense if self.dense else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "dense_macs": self.dense,
            "sparse_macs": self.sparse,
            "attention_macs": self.attention,
            "saved_fraction": self.saved_fraction,
            "input": self.input_desc,
            "layers": [lm.__dict__ for lm in self.layers],
        }


class _AttentionMacs(TorchFunctionMode):
    """Counts B·H·Lq·Lk·(E + Ev) MACs per scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
            batch = q.shape[:-2].numel()
            self.macs += int(batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        return func(*args, **(kwargs or {}))


def sparse_factor(weight: torch.Tensor, pattern: str | Pattern) -> tuple[str, float]:
    """(pattern name, MAC factor) for ``weight``: k/n when it satisfies the pattern, else ("dense", 1).

    ``pattern="auto"`` picks the sparsest pattern of :data:`DEPLOYABLE_KN` the weight satisfies.
    """
    candidates = DEPLOYABLE_KN if str(pattern) == "auto" else (str(pattern),)
    best = ("dense", 1.0)
    for text in candidates:
        pat = Pattern.parse(text)
        if not pat.is_kn or not pat.eligible(tuple(weight.shape)):
            continue
        if check_nm(weight, pat.k, pat.n) and pat.k / pat.n < best[1]:
            best = (str(pat), pat.k / pat.n)
    return best


def _inputs(example: torch.Tensor | Sequence[int] | tuple) -> tuple:
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(isinstance(s, int) for s in example):
        return (torch.randn(*example),)
    return tuple(example)


def count_macs(
    model: Callable[..., Any],
    example: torch.Tensor | Sequence[int] | tuple,
    pattern: str | Pattern = "auto",
    modules: nn.Module | None = None,
    selection: LayerSelection | None = None,
) -> MacCount:
    """Count the MACs of one forward pass.

    Args:
        model: an ``nn.Module`` or any callable (e.g. a ToMe-patched forward).
        example: an input tensor, a tuple of inputs, or a shape such as (1, 3, 224, 224)
            (random normal input).
        pattern: the k:n pattern sparse layers are counted at, ``"auto"`` (sparsest
            deployable pattern each weight satisfies) or ``"dense"``.
        modules: the module holding the weights when ``model`` is not itself a module.
        selection: which layers are targets (default :class:`LayerSelection`).

    Returns:
        A :class:`MacCount`; ``sparse`` counts each target layer whose weight satisfies
        the pattern at k/n of its measured MACs.
    """
    inputs = _inputs(example)
    root = modules if modules is not None else (model if isinstance(model, nn.Module) else None)
    counter = FlopCounterMode(display=False)
    attention = _AttentionMacs()
    with torch.no_grad(), counter, attention:
        model(*inputs)
    counts = counter.get_flop_counts()
    glob = counts.get("Global", {})
    attn_flops_seen = sum(v for op, v in glob.items() if "attention" in str(op))
    dense = (counter.get_total_flops() - attn_flops_seen) // 2 + attention.macs
    per_module = {key.split(".", 1)[1]: sum(ops.values()) for key, ops in counts.items() if "." in key}
    layers: list[LayerMacs] = []
    saved = 0.0
    if root is not None:
        targets, _ = find_target_layers(root, selection)
        for t in targets:
            flops = sum(per_module.get(n, 0) for n in (t.name, *t.aliases))
            if not flops:
                continue
            name, factor = ("dense", 1.0) if str(pattern) == "dense" else sparse_factor(t.weight.detach(), pattern)
            macs = flops // 2
            layers.append(LayerMacs(t.name, macs, name, macs * factor))
            saved += macs * (1.0 - factor)
    desc = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    return MacCount(dense, dense - saved, attention.macs, layers, desc)


def mac_table(
    model: Callable[..., Any],
    input_shape: torch.Tensor | Sequence[int] | tuple,
    *patterns: str,
    modules: nn.Module | None = None,
) -> str:
    """A text table of MACs per pattern: dense, then each pattern (default "2:4" and "auto").

    Each row counts only layers whose weights satisfy that pattern; ``G`` = 10⁹ MACs.
    """
    patterns = patterns or ("2:4", "auto")
    rows = [f"{'pattern':<10} {'GMACs':>10} {'× dense':>8} {'sparse layers':>14}"]
    dense = count_macs(model, input_shape, "dense", modules=modules)
    rows.append(f"{'dense':<10} {dense.dense / 1e9:10.4f} {1.0:8.3f} {0:>14}")
    for pat in patterns:
        mc = count_macs(model, input_shape, pat, modules=modules)
        n_sparse = sum(lm.pattern != "dense" for lm in mc.layers)
        ratio = mc.sparse / mc.dense if mc.dense else 1.0
        rows.append(f"{pat:<10} {mc.sparse / 1e9:10.4f} {ratio:8.3f} {n_sparse:>14}")
    return "\n".join(rows)
