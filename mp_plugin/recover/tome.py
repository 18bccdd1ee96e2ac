"""Token merging (ToMe, Bolya et al., ICLR 2023) for timm Vision Transformers.

Our own implementation of the method as the paper describes it; no code of the reference
repository is used. In every patched block, between the attention and the MLP branch, the
``r`` most similar token pairs are merged:

1. **Bipartite soft matching.** The non-prefix tokens are split alternately into sets A
   (even positions) and B (odd positions). Prefix tokens (class / distillation / register
   tokens, timm's ``num_prefix_tokens``) are never merged. Similarity is the cosine of the
   attention keys averaged over heads. Each A token picks its most similar B token; the
   ``r`` A tokens with the highest such similarity are merged into their B partner.
2. **Size-weighted averaging.** Every token carries a size (how many input patches it
   stands for); a merge averages features weighted by size and adds the sizes.
3. **Proportional attention** (optional, ``prop_attn``): ``log(size)`` of each key is
   added to the attention logits, so a merged token is attended to as the patches it
   replaces would be. ToMe's documentation recommends it for off-the-shelf evaluation.

``apply_patch`` keeps every other feature of a timm :class:`~timm.models.vision_transformer.Block`
(LayerScale ``ls1``/``ls2``, DropPath, norms, ``qk_norm``, attention ``norm``/``gate``,
biases, dropout, fused or explicit attention). With ``r = 0`` each block delegates to its
original forward, so outputs are bit-for-bit those of the unpatched model. With average
pooling (``global_pool="avg"``/``"avgmax"``) the patched model pools with the token sizes
as weights, so the pooled feature is the mean over the original patches.

The patch is a set of bound methods on the instances (no global state, ``state_dict``
unchanged); :func:`remove_patch` deletes them.
"""

from __future__ import annotations

import copy
import math
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import ConfigError, PatternError

__all__ = [
    "MergePlan",
    "ToMeState",
    "apply_patch",
    "bipartite_soft_matching",
    "format_tome_mac_table",
    "is_patched",
    "merge_weighted",
    "remove_patch",
    "tome_mac_table",
    "tokens_per_block",
]


@dataclass
class ToMeState:
    """Per-model token-merging settings and the sizes of the current forward pass.

    Stored on the patched model as ``model._tome`` and shared by its blocks; change
    ``r`` or ``prop_attn`` at any time after patching.

    Attributes:
        r: tokens merged per block; an int (the same for every block) or one int per block.
        prop_attn: add log(token size) to the attention logits.
        trace_source: keep ``source``, which input tokens each current token is made of.
        num_prefix_tokens: leading tokens that are never merged.
        num_blocks: number of patched blocks.
        size: (B, N, 1) token sizes after the last block run; ``None`` until a merge happens.
        source: (B, N, N_in) 0/1 matrix, row i = the input tokens merged into token i;
            ``None`` unless ``trace_source`` and a merge happened.
    """

    r: int | Sequence[int] = 8
    prop_attn: bool = True
    trace_source: bool = False
    num_prefix_tokens: int = 1
    num_blocks: int = 0
    size: torch.Tensor | None = field(default=None, repr=False)
    source: torch.Tensor | None = field(default=None, repr=False)

    def r_for(self, index: int) -> int:
        """The requested r of block ``index`` (before clamping to the tokens available)."""
        if isinstance(self.r, int):
            return self.r
        r = list(self.r)
        if len(r) != self.num_blocks:
            raise ValueError(f"r has {len(r)} entries, the model has {self.num_blocks} patched blocks")
        return int(r[index])

    def reset(self) -> None:
        """Forget the sizes and sources of the previous forward pass."""
        self.size = None
        self.source = None


@dataclass
class MergePlan:
    """The result of bipartite soft matching on (B, N, ·) tokens.

    Attributes:
        num_prefix_tokens: leading tokens passed through unchanged.
        src_idx: (B, r) indices into set A of the tokens merged away.
        dst_idx: (B, r) indices into set B of their partners.
        keep_idx: (B, |A| − r) indices into set A of the tokens kept, ascending.
    """

    num_prefix_tokens: int
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    keep_idx: torch.Tensor

    @property
    def r(self) -> int:
        """Tokens removed by this plan."""
        return self.src_idx.shape[1]

    def merge_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the features of each merged group.

        Args:
            t: (B, N, C) per-token values, N the token count the plan was made for.

        Returns:
            (B, N − r, C): ``[prefix, kept A tokens, B tokens + the A tokens merged into them]``.
        """
        p = self.num_prefix_tokens
        rest = t[:, p:]
        a, b = rest[:, 0::2], rest[:, 1::2]
        c = t.shape[-1]
        kept = a.gather(1, self.keep_idx.unsqueeze(-1).expand(-1, -1, c))
        src = a.gather(1, self.src_idx.unsqueeze(-1).expand(-1, -1, c))
        b = b.scatter_add(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, c), src)
        return torch.cat([t[:, :p], kept, b], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> MergePlan:
    """Choose the ``r`` token merges of one block.

    Args:
        metric: (B, N, D) per-token features to compare (ToMe: head-mean attention keys).
        r: tokens to remove; clamped to ⌊(N − prefix)/2⌋ = |B| as in ToMe's reference
            (``tome/merge.py``), so at least half of the non-prefix tokens remain.
        num_prefix_tokens: leading tokens that are neither merged nor merged into.

    Returns:
        A :class:`MergePlan` (``plan.r`` is the clamped r).
    """
    rest = metric[:, num_prefix_tokens:]
    n_a, n_b = (rest.shape[1] + 1) // 2, rest.shape[1] // 2
    r = max(0, min(int(r), n_b))  # the reference's clamp: r ≤ ⌊(N − prefix)/2⌋
    if r == 0:
        empty = torch.zeros(metric.shape[0], 0, dtype=torch.long, device=metric.device)
        keep = torch.arange(n_a, device=metric.device).expand(metric.shape[0], -1)
        return MergePlan(num_prefix_tokens, empty, empty, keep)
    with torch.no_grad():
        unit = F.normalize(rest.float(), dim=-1)
        scores = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|) cosine similarities
        best, partner = scores.max(dim=-1)  # (B, |A|)
        order = best.argsort(dim=-1, descending=True)
        src_idx = order[:, :r]
        keep_idx = order[:, r:].sort(dim=-1).values
        dst_idx = partner.gather(1, src_idx)
    return MergePlan(num_prefix_tokens, src_idx, dst_idx, keep_idx)


def merge_weighted(plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens.

    Args:
        plan: from :func:`bipartite_soft_matching`.
        x: (B, N, C) token features.
        size: (B, N, 1) token sizes, or ``None`` for all ones.

    Returns:
        ``(x_merged, size_merged)`` of shapes (B, N − r, C) and (B, N − r, 1).
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    new_size = plan.merge_sum(size)
    return plan.merge_sum(x * size) / new_size, new_size


def _attention_with_keys(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ``Attention`` forward that also returns the head-mean keys.

    Args:
        attn: a timm ``Attention`` module (its own submodules and flags are used).
        x: (B, N, C) normalised tokens.
        size: (B, N, 1) token sizes for proportional attention, or ``None``.

    Returns:
        ``(out, keys)``: (B, N, C_out) attention output and (B, N, head_dim) head-mean keys.
    """
    b, n, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log().to(q.dtype).reshape(b, 1, 1, n) if size is not None else None
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1)


def _tome_block_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a patched timm ``Block``: attention, merge r tokens, MLP."""
    state: ToMeState = self._tome
    index: int = self._tome_index
    if index == 0:
        state.reset()
    r = state.r_for(index)
    if r <= 0 and (state.size is None or not state.prop_attn):
        return type(self).forward(self, x, *args, **kwargs)  # the unpatched ops, bit for bit
    attn_mask = args[0] if args else kwargs.get("attn_mask")
    if attn_mask is not None or kwargs.get("is_causal", False) or (len(args) > 1 and args[1]):
        raise ValueError("token merging does not support attn_mask / is_causal")
    size = state.size if state.prop_attn else None
    attn_out, keys = _attention_with_keys(self.attn, self.norm1(x), size)
    x = x + self.drop_path1(self.ls1(attn_out))
    if r > 0:
        plan = bipartite_soft_matching(keys, r, state.num_prefix_tokens)
        if plan.r > 0:
            if state.trace_source:
                if state.source is None:
                    eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
                    state.source = eye.expand(x.shape[0], -1, -1)
                state.source = plan.merge_sum(state.source)
            x, state.size = merge_weighted(plan, x, state.size)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _tome_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """``VisionTransformer.pool`` with size-weighted average pooling after merges."""
    state: ToMeState = self._tome
    kind = self.global_pool if pool_type is None else pool_type
    size = state.size
    if (
        size is None
        or kind not in ("avg", "avgmax")
        or getattr(self, "attn_pool", None) is not None
        or size.shape[:2] != x.shape[:2]
    ):
        return type(self).pool(self, x, pool_type)
    start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
    tokens, weight = x[:, start:], size[:, start:].to(x.dtype)
    mean = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
    return mean if kind == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


def _timm_classes() -> tuple[type | None, type | None]:
    """timm's ``Block`` and ``Attention`` classes when timm is loaded (a timm model has loaded it); never imports it."""
    vit, layers = sys.modules.get("timm.models.vision_transformer"), sys.modules.get("timm.layers")
    return getattr(vit, "Block", None), getattr(layers, "Attention", None)


def _find_blocks(model: nn.Module) -> list[nn.Module]:
    block_cls, attn_cls = _timm_classes()
    blocks = [m for m in model.modules() if block_cls is not None and isinstance(m, block_cls)]
    if not blocks:
        raise ConfigError(
            f"{type(model).__name__} has no timm vision_transformer.Block to patch: ToMe needs a timm ViT"
        )
    for blk in blocks:
        if not isinstance(blk.attn, attn_cls):
            raise ConfigError(f"ToMe supports timm Attention only, found {type(blk.attn).__name__}")
    return blocks


def is_patched(model: nn.Module) -> bool:
    """True when :func:`apply_patch` was applied to ``model`` and not removed."""
    return isinstance(getattr(model, "_tome", None), ToMeState)


def apply_patch(
    model: nn.Module, r: int | Sequence[int] = 8, prop_attn: bool = True, trace_source: bool = False
) -> nn.Module:
    """Patch every timm ``Block`` of ``model`` in place to merge ``r`` tokens per block.

    Args:
        model: a timm ``VisionTransformer`` / DeiT (or any module holding timm ``Block`` s
            with timm ``Attention``, in execution order).
        r: tokens merged per block (int), or one r per block. Clamped per block so that at
            least the prefix tokens + 1 remain. With 0 the model computes exactly the
            unpatched outputs.
        prop_attn: proportional attention (log(size) added to the attention logits).
        trace_source: record in ``model._tome.source`` which input tokens each output token
            merges, shape (B, N_out, N_in).

    Returns:
        ``model`` itself; ``model._tome`` (:class:`ToMeState`) holds ``r``, ``prop_attn``,
        and the token ``size`` (B, N, 1) of the last forward. Patching twice only updates
        the settings.
    """
    if is_patched(model):
        state = model._tome
        state.r, state.prop_attn, state.trace_source = r, prop_attn, trace_source
        return model
    blocks = _find_blocks(model)
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = int(getattr(model, "cls_token", None) is not None)
    state = ToMeState(r, prop_attn, trace_source, int(prefix), len(blocks))
    state.r_for(0)  # validates a per-block list
    model._tome = state
    for index, blk in enumerate(blocks):
        blk._tome = state
        blk._tome_index = index
        blk.forward = types.MethodType(_tome_block_forward, blk)
    if callable(getattr(type(model), "pool", None)) and hasattr(model, "global_pool"):
        model.pool = types.MethodType(_tome_pool, model)
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_patch`: every block runs its original forward again.

    Returns:
        ``model`` itself (a model that was never patched is returned unchanged).
    """
    if not is_patched(model):
        return model
    for m in model.modules():
        if isinstance(getattr(m, "_tome", None), ToMeState):
            for name in ("forward", "pool", "_tome", "_tome_index"):
                m.__dict__.pop(name, None)
    return model


def tokens_per_block(model: nn.Module, num_tokens: int) -> list[int]:
    """Token count entering each patched block for an input of ``num_tokens`` tokens.

    Follows the clamping rule of :func:`bipartite_soft_matching`; the last entry is the
    count leaving the last block, so the list has ``num_blocks + 1`` entries.
    """
    state: ToMeState = model._tome
    counts = [num_tokens]
    for index in range(state.num_blocks):
        rest = counts[-1] - state.num_prefix_tokens
        r = max(0, min(state.r_for(index), rest // 2))
        counts.append(counts[-1] - r)
    return counts


def _prune_linear_nm(model: nn.Module, k: int, n: int) -> int:
    from mp_plugin.layers.discovery import LayerSelection, find_target_layers
    from mp_plugin.masks.select import magnitude_kn_

    magnitude_kn_(model, k, n, LayerSelection(include_conv=False))
    return len(find_target_layers(model, LayerSelection(include_conv=False))[0])


def tome_mac_table(
    model: nn.Module, r: int | Sequence[int] = 8, pattern: str = "2:4", img_size: int = 224
) -> dict[str, Any]:
    """MACs of one image through a ViT: dense, ToMe, k:n Linear layers, and ToMe + k:n.

    Measured with :func:`mp_plugin.masks.macs.count_macs` (torch ``FlopCounterMode``) on a real
    forward, so the merged token counts and the matching cost are included. The k:n rows
    prune a copy's target Linear layers (classifier head excluded) with
    :func:`mp_plugin.masks.select.nm_mask` and count them at k/n. Weights are not changed in
    ``model`` (MACs do not depend on the values: a randomly initialised model gives the same
    table, see :func:`mp_plugin.evaluation.models.random_timm_model`).

    Args:
        model: a timm ViT module.
        r: tokens merged per block.
        pattern: k:n pattern such as ``"2:4"``.
        img_size: input height = width in pixels; input is (1, 3, img_size, img_size).

    Returns:
        dict with ``dense_macs``, ``tome_macs``, ``sparse_macs``, ``tome_sparse_macs`` (MACs),
        ``*_reduction_pct`` (% fewer than dense), ``tokens_per_block`` and the settings.
    """
    from mp_plugin.layers.patterns import Pattern
    from mp_plugin.masks.macs import count_macs

    pat = Pattern.parse(pattern)
    if not pat.is_kn:
        raise PatternError(f"the MAC table's pattern must be k:n, got {pattern!r}")
    dense_model = copy.deepcopy(model).eval()
    if is_patched(dense_model):  # an already-patched model: its dense row must not merge tokens
        remove_patch(dense_model)
    sparse_model = copy.deepcopy(dense_model)
    n_pruned = _prune_linear_nm(sparse_model, pat.k, pat.n)
    x = torch.randn(1, 3, img_size, img_size)
    dense = count_macs(dense_model, x, "dense").dense
    sparse = count_macs(sparse_model, x, str(pat)).sparse
    apply_patch(dense_model, r=r)
    apply_patch(sparse_model, r=r)
    tome = count_macs(dense_model, x, "dense").dense
    tome_sparse = count_macs(sparse_model, x, str(pat)).sparse
    with torch.no_grad():
        n_tokens = dense_model.patch_embed(x).shape[1] + dense_model._tome.num_prefix_tokens

    def pct(v: float) -> float:
        return 100.0 * (1.0 - v / dense) if dense else math.nan

    name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    return {
        "model": name,
        "img_size": img_size,
        "r": r,
        "pattern": str(pat),
        "sparse_linear_layers": n_pruned,
        "tokens_per_block": tokens_per_block(dense_model, n_tokens),
        "dense_macs": int(dense),
        "tome_macs": int(tome),
        "sparse_macs": float(sparse),
        "tome_sparse_macs": float(tome_sparse),
        "tome_reduction_pct": pct(tome),
        "sparse_reduction_pct": pct(sparse),
        "tome_sparse_reduction_pct": pct(tome_sparse),
    }


def format_tome_mac_table(table: dict[str, Any]) -> str:
    """A text table of :func:`tome_mac_table`'s result (G = 10⁹ MACs)."""
    rows = [
        f"{table['model']}  img {table['img_size']}  r={table['r']}  pattern {table['pattern']}",
        f"{'variant':<16} {'GMACs':>9} {'reduction':>10}",
    ]
    for label, key, red in (
        ("dense", "dense_macs", None),
        ("ToMe", "tome_macs", "tome_reduction_pct"),
        (table["pattern"], "sparse_macs", "sparse_reduction_pct"),
        (f"ToMe+{table['pattern']}", "tome_sparse_macs", "tome_sparse_reduction_pct"),
    ):
        pct = f"{table[red]:9.2f}%" if red else f"{'—':>10}"
        rows.append(f"{label:<16} {table[key] / 1e9:9.3f} {pct}")
    rows.append("tokens per block: " + " ".join(str(t) for t in table["tokens_per_block"]))
    return "\n".join(rows)
