"""Prune and restore a whole model, one-shot or sequentially (block by block).

One-shot: every layer's Gram is captured on the dense model in one calibration
pass, then each layer is pruned and restored. Sequential
(``RestoreConfig(sequential=True)``): layers are taken in forward order, grouped
into blocks (a transformer block, a conv stage: the module-name prefix up to its
first index, e.g. ``blocks.3``, ``encoder.layer.2``, ``model.layers.5``), and
each block's Grams are captured on the model already pruned and restored before
it, so every layer also corrects its predecessors' error (what SparseGPT and
llm-compressor's sequential pipeline do). Only the current block's Grams are held.
A run of sibling blocks (``model.layers.0 … N``) is replayed on cached block inputs
(``mp_plugin.restore.chain``): one block forward per block instead of a forward of
everything before it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.calibration import eval_mode, first_batch, run_batches
from mp_plugin.layers.offload import onloaded
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.cast import CastConfig
from mp_plugin.masks.select import check_nm
from mp_plugin.progress import progress
from mp_plugin.restore.chain import block_runs, cache_run_inputs, replay_run
from mp_plugin.restore.config import RestoreConfig
from mp_plugin.restore.hessian import LayerGram, capture_grams
from mp_plugin.restore.layer import NEEDS_GRAM, restore_layer, select_mask

__all__ = ["LayerTask", "execution_order", "block_key", "forward_blocks", "block_grams", "prune_and_restore"]

_INDEX = re.compile(r"^\d+$")


@dataclass
class LayerTask:
    """One layer to prune: its module name, module, pattern and (unstructured) count."""

    name: str
    module: nn.Module
    pattern: Pattern
    n_prune: int


def execution_order(
    model: nn.Module, names: Sequence[str], data: Any, calls: dict[str, int] | None = None
) -> list[str]:
    """``names`` in the order the first calibration batch calls them; layers never called come last.

    ``calls``, when given, receives how many times that batch calls each layer.
    """
    modules = dict(model.named_modules())
    seen: list[str] = []
    handles = []
    calls = {} if calls is None else calls

    def hook(name: str):  # noqa: ANN202
        def fn(module: nn.Module, inputs: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in seen:
                seen.append(name)

        return fn

    try:
        with eval_mode(model):
            for name in names:
                handles.append(modules[name].register_forward_pre_hook(hook(name)))
            batch = first_batch(data)
            if batch is not None:
                run_batches(model, [batch])
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


def block_key(name: str) -> str:
    """The block a layer belongs to: its name up to and including the first numeric component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return name


def forward_blocks(order: Sequence[str]) -> list[list[str]]:
    """Consecutive layers (in forward order) with the same :func:`block_key`, as blocks."""
    blocks: list[list[str]] = []
    for name in order:
        if blocks and block_key(blocks[-1][-1]) == block_key(name):
            blocks[-1].append(name)
        else:
            blocks.append([name])
    return blocks


def block_grams(
    model: nn.Module,
    names: Sequence[str],
    calibration: Any,
    config: RestoreConfig,
    sequential: bool,
    source: nn.Module | None = None,
) -> Iterator[tuple[list[str], dict[str, LayerGram]]]:
    """Yield ``(block, {name: LayerGram})`` in forward order, the Grams captured just before the block is used.

    Sequential: one block at a time (:func:`forward_blocks`), each captured on ``model`` as the
    caller has changed it so far, the forward pass stopping after the block's last layer (unless
    a layer of the block runs more than once per forward: then the pass runs to the end).
    One-shot: a single block of every layer, captured on ``source`` (default ``model``)
    before anything is changed. Only the yielded block's Grams are held.
    """
    dt = torch.float64 if config.dtype == "float64" else torch.float32
    calls: dict[str, int] = {}
    order = execution_order(model, list(names), calibration, calls)
    if not sequential:
        grams = capture_grams(source or model, order, calibration, dtype=dt, max_rows=config.max_rows)
        yield order, grams
        return
    blocks = forward_blocks(order)
    keys = [block_key(b[0]) for b in blocks]
    runs = dict(block_runs(keys, blocks))
    modules = dict(model.named_modules())  # a block key is a prefix of its layers' names: always a module
    i = 0
    while i < len(blocks):
        if i in runs:
            cache, n = cache_run_inputs(model, [modules[k] for k in keys[i : runs[i]]], calibration)
            if cache is not None:
                replay = replay_run(model, cache, blocks[i : i + n], dt, config.max_rows)
                try:
                    first = next(replay)
                except StopIteration:  # block 0 re-run on its cached inputs differs: the ordinary way
                    first = None
                if first is not None:
                    yield first
                    yield from replay
                    i += n
                    continue
        block = blocks[i]
        # stopping after the block's last layer would miss a layer the forward calls again later
        stop = block[-1] if all(calls.get(n, 0) <= 1 for n in block) else None
        grams = capture_grams(model, block, calibration, dtype=dt, max_rows=config.max_rows, stop_after=stop)
        yield block, grams
        del grams
        i += 1


def prune_and_restore(
    model: nn.Module,
    tasks: Sequence[LayerTask],
    calibration: Any,
    projection: str = "magnitude",
    restore: RestoreConfig | None = None,
    cast_config: CastConfig | None = None,
    show_progress: bool = False,
    records: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Prune every task's layer with ``projection`` and, with ``restore``, re-solve its kept weights.

    Args:
        model: the model, pruned in place.
        tasks: the layers (not yet pruned) with their patterns and counts.
        calibration: batch(es) of model inputs (see ``mp_plugin.layers.calibration.run_batches``).
        projection: mask selection, a name in ``mp_plugin.restore.PROJECTIONS``.
        restore: restore settings, or None to prune only (Gram-based projections still work).
        cast_config: CAST settings for ``projection="cast"``.
        show_progress: a tqdm bar over layers.
        records: a dict filled layer by layer as they are done (returned); when the run fails
            part-way (sequential restore meeting a non-finite input), it holds the layers
            already pruned.

    Returns:
        ``{layer name: record}`` with ``method`` and, when restored, ``restore``
        (see :func:`~mp_plugin.restore.restore_layer`).

    Raises:
        MPPluginError: calibration missing, or a layer's input not finite (``RestoreError``).
    """
    cfg = restore or RestoreConfig()
    needs_gram = restore is not None or projection in NEEDS_GRAM
    if needs_gram and (calibration is None or (isinstance(calibration, list) and not calibration)):
        what = "restore" if restore is not None else f"projection {projection!r}"
        raise MPPluginError(f"{what} needs calibration data (one batch or a list of batches of model inputs)")
    by_name = {t.name: t for t in tasks}
    if needs_gram:
        blocks = block_grams(model, list(by_name), calibration, cfg, cfg.sequential)
    else:
        blocks = iter([(list(by_name), {})])
    records = {} if records is None else records
    bar = progress(
        total=len(tasks), desc="prune+restore" if restore else "prune", unit="layer", disable=not show_progress
    )
    for block, grams in blocks:
        for name in block:
            task = by_name[name]
            with onloaded([task.module], write=True), _dense_on_error(task.module.weight) as dense:
                # accelerate-offloaded: in, pruned, written back; on an error the layer stays dense
                records[name] = _prune_one(
                    task, dense, grams.get(name), needs_gram, projection, restore, cfg, cast_config
                )
            bar.update(1)
    bar.close()
    return records


@contextlib.contextmanager
def _dense_on_error(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yields a copy of ``weight``; when the block raises (Ctrl-C included), the weight gets it back.

    (An accelerate CPU dict store shares memory with the weight brought in, so without this a
    failed layer would stay half-changed there, and in memory, while no record names it.)
    """
    dense = weight.detach().clone()
    try:
        yield dense
    except BaseException:
        with torch.no_grad():
            weight.copy_(dense)
        raise


def _prune_one(
    task: LayerTask,
    dense: torch.Tensor,
    gram: LayerGram | None,
    needs_gram: bool,
    projection: str,
    restore: RestoreConfig | None,
    cfg: RestoreConfig,
    cast_config: CastConfig | None,
) -> dict[str, Any]:
    """Prune (and restore) one layer in place from its ``dense`` weight; its record."""
    weight = task.module.weight
    groups = int(getattr(task.module, "groups", 1))
    entry: dict[str, Any] = {"pattern": str(task.pattern)}
    if needs_gram and gram is None:
        mask = select_mask(dense, task.pattern, task.n_prune, "magnitude", None, cfg, cast_config, groups)
        entry["method"] = "magnitude (layer not reached by calibration; not restored)"
        with torch.no_grad():
            weight.copy_(dense * mask)
        return entry
    mask = select_mask(dense, task.pattern, task.n_prune, projection, gram, cfg, cast_config, groups)
    entry["method"] = projection
    with torch.no_grad():
        weight.copy_(dense * mask)
    if restore is not None:
        entry["restore"] = restore_layer(weight, dense, gram, cfg, groups=groups)
        if task.pattern.is_kn and not check_nm(weight.detach(), task.pattern.k, task.pattern.n):
            raise MPPluginError(f"layer {task.name!r}: restore broke the {task.pattern} pattern")
    return entry
