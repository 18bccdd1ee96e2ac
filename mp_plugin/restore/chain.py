"""Sequential restore through a stack of blocks on cached block inputs.

A decoder or encoder stack (``model.layers.0 … model.layers.N``, ``blocks.0 …``)
calls its blocks one after the other, each on the previous block's output and
on side inputs that every block shares (attention mask, rotary embeddings). For
such a run of blocks the calibration inputs of the first block are captured
once; after that each block is run on its own cached inputs: once with Gram
hooks on its layers (before they are pruned) and once more after pruning and
restore, to give the next block its inputs. That is one block forward per block
and pass, instead of a forward of every block before it (what llm-compressor's
layer-sequential pipeline and SparseGPT's reference do). Only one block's
inputs (calibration tokens × width) are held.

Whether a run qualifies is checked on the model's own first calibration batch,
not assumed from its class: each block's hidden input must be the very tensor
the block before returned, every side input must equal the first block's, and
the first block re-run on its cached inputs must reproduce the output seen in
the full forward. A run that fails a check is restored the ordinary way (a
forward of the model up to each block).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mp_plugin.layers.calibration import active_token_mask, eval_mode, real_tokens
from mp_plugin.restore.hessian import LayerGram, StopForward, gram_hooks, grams_of, run_stoppable

__all__ = ["block_runs", "CachedRun", "cache_run_inputs", "replay_run"]

_INDEX = re.compile(r"^(.*)\.(\d+)$")
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")  # must not grow on a re-run
_MATCH_TOL = 1e-3  # relative norm difference allowed between a re-run block and the full forward


def block_runs(keys: Sequence[str], blocks: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Runs ``[i, j)`` of at least two consecutive blocks whose keys are siblings ``P.k, P.k+1, …``.

    Args:
        keys: each block's module name (``block_key`` of its layers).
        blocks: each block's layer names, in forward order.

    Returns:
        Half-open index ranges into ``blocks``; every layer of a block in a run lies inside its key's module.
    """
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(keys):
        j = i + 1
        m = _INDEX.match(keys[i])
        inside = all(n.startswith(keys[i] + ".") for n in blocks[i])
        if m and inside:
            parent, idx = m.group(1), int(m.group(2))
            while j < len(keys):
                mj = _INDEX.match(keys[j])
                if not (mj and mj.group(1) == parent and int(mj.group(2)) == idx + (j - i)):
                    break
                if not all(n.startswith(keys[j] + ".") for n in blocks[j]):
                    break
                j += 1
        if j - i >= 2:
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


@dataclass
class CachedRun:
    """The cached calibration inputs of the current block of a run.

    Attributes:
        modules: the run's block modules, in forward order.
        slot: where the hidden input sits: ``("arg", position)`` or ``("kwarg", name)``.
        args: per batch, the block's positional arguments.
        kwargs: per batch, its keyword arguments (KV caches replaced by None, ``use_cache=False``).
        masks: per batch, the real-token mask (None for non-token batches).
        first_output: block 0's output on batch 0 in the full forward (for the re-run check).
    """

    modules: list[nn.Module]
    slot: tuple[str, Any]
    args: list[list[Any]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    first_output: torch.Tensor | None = None

    def add(self, args: tuple, kwargs: dict[str, Any], mask: torch.Tensor | None) -> None:
        """Cache one batch's call of the first block (KV caches replaced by None)."""
        self.args.append(list(args))
        self.kwargs.append({k: None if _is_cache(k, v) else v for k, v in kwargs.items()})
        if "use_cache" in kwargs:
            self.kwargs[-1]["use_cache"] = False
        self.masks.append(mask)


def _hidden(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, bool, str, type(None))) and isinstance(b, (int, float, bool, str, type(None))):
        return a == b
    return False


def _is_cache(key: str, value: Any) -> bool:
    """A KV cache argument, which a re-run must not extend."""
    return key in _CACHE_KWARGS or type(value).__name__.endswith("Cache")


def _side_inputs(args: Sequence[Any], kwargs: dict[str, Any], slot: tuple[str, Any]) -> tuple[list, dict]:
    a = [x for i, x in enumerate(args) if slot != ("arg", i)]
    k = {n: v for n, v in kwargs.items() if slot != ("kwarg", n) and not _is_cache(n, v)}
    return a, k


def cache_run_inputs(model: nn.Module, modules: Sequence[nn.Module], calibration: Any) -> tuple[CachedRun | None, int]:
    """Capture the first block's calibration inputs and check that the run can be replayed.

    Returns:
        ``(cache, n)``: the cache for the first ``n`` blocks of ``modules`` that pass the
        checks (``n ≥ 2``), or ``(None, 0)`` when fewer do.
    """
    batches = calibration if isinstance(calibration, list) else [calibration]
    # checked as the run goes, so only block 0's call and output and the previous block's output are held
    state: dict[str, Any] = {"call0": None, "out0": None, "prev": None, "slot": None, "side0": None, "n": 0}
    first_mask: list[torch.Tensor | None] = [None]

    def pre(i: int):  # noqa: ANN202
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if state["n"] != i:  # a block called twice, or out of order: the chain ends here
                raise StopForward
            if i == 0:
                state["call0"] = (args, kwargs)
                first_mask[0] = active_token_mask()
                return
            slots = _slots((args, kwargs), state["prev"])
            if i == 1:
                if len(slots) != 1:
                    raise StopForward
                state["slot"] = slots[0]
                state["side0"] = _side_inputs(*state["call0"], slots[0])
            if slots != [state["slot"]] or not _same(_side_inputs(args, kwargs, state["slot"]), state["side0"]):
                raise StopForward

        return fn

    def post(i: int):  # noqa: ANN202
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state["prev"] = _hidden(output)
            if i == 0:
                state["out0"] = state["prev"]
            state["n"] = i + 1
            if i == len(modules) - 1:
                raise StopForward

        return fn

    handles = []
    try:
        for i, m in enumerate(modules):
            handles.append(m.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(m.register_forward_hook(post(i), with_kwargs=True))
        run_stoppable(model, batches[0])
    finally:
        for h in handles:
            h.remove()
    state["prev"] = None
    n, slot = state["n"], state["slot"]
    if n < 2 or slot is None or state["out0"] is None:
        return None, 0
    cache = CachedRun(list(modules[:n]), slot, first_output=state["out0"])
    cache.add(*state["call0"], first_mask[0])

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache.add(args, kwargs, active_token_mask())
        raise StopForward

    handle = modules[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run_stoppable(model, batches[1:], first=1)
    finally:
        handle.remove()
    return cache, n


def _slots(call: tuple[tuple, dict], prev: torch.Tensor) -> list[tuple[str, Any]]:
    args, kwargs = call
    found: list[tuple[str, Any]] = [("arg", i) for i, a in enumerate(args) if a is prev]
    found += [("kwarg", k) for k, v in kwargs.items() if v is prev]
    return found


def _run_block(module: nn.Module, cache: CachedRun, b: int) -> torch.Tensor:
    with real_tokens(cache.masks[b]):
        out = _hidden(module(*cache.args[b], **cache.kwargs[b]))
    if out is None:
        raise RuntimeError("block returned no tensor")
    return out


def _set_hidden(cache: CachedRun, b: int, value: torch.Tensor) -> None:
    kind, where = cache.slot
    if kind == "arg":
        cache.args[b][where] = value
    else:
        cache.kwargs[b][where] = value


def replay_run(
    model: nn.Module,
    cache: CachedRun,
    blocks: Sequence[Sequence[str]],
    dtype: torch.dtype,
    max_rows: int | None,
) -> Iterator[tuple[list[str], dict[str, LayerGram]]]:
    """Yield ``(block, grams)`` for each block of the run, Grams taken on the cached inputs.

    The caller prunes and restores the block between yields; on resuming, the block is
    re-run on its inputs to give the next block's. Before anything is yielded, block 0
    re-run on batch 0 must reproduce the full forward's output; if it does not, nothing is
    yielded and the caller falls back.
    """
    for i, (module, names) in enumerate(zip(cache.modules, blocks)):
        with eval_mode(model), torch.no_grad(), gram_hooks(model, names, dtype, max_rows) as hooks:
            for b in range(len(cache.args)):
                out = _run_block(module, cache, b)
                if i == 0 and b == 0 and not _close(out, cache.first_output):
                    return
        yield list(names), grams_of(hooks)
        if i + 1 < len(cache.modules):
            with eval_mode(model), torch.no_grad():
                for b in range(len(cache.args)):
                    _set_hidden(cache, b, _run_block(module, cache, b))


def _close(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    if b is None or a.shape != b.shape:
        return False
    den = float(b.float().norm())
    return float((a.float() - b.float()).norm()) <= _MATCH_TOL * max(den, 1e-12)
