"""MP fits of a model's target layers, streamed: bounded batches, optionally spread over ranks.

:func:`fit_target_layers` is the analysis behind :func:`mp_plugin.plan`. Layers are
grouped by matrix shape and device and cut into *work units* whose Gram matrices
fit a byte budget (``max_batch_bytes``); one unit is fitted at a time, so the
workspace is one unit's Gram matrices plus one slice of a weight
(:func:`mp_plugin.spectrum.gram_matrix`), whatever the model's size. A fit keeps
its statistics and the p singular values; the Gram matrices are dropped.

Layer parallelism: with ``distributed=True`` under an initialised
``torch.distributed`` process group (``torchrun``, any backend), each rank fits a
share of the units, balanced by their Gram + eigen-solve cost, and the fits are
gathered with ``all_gather_object``, so every rank returns the same list. Every
rank must hold the full model (as DDP does) and call this together.

Offloading: a model dispatched by Hugging Face ``accelerate`` (``device_map`` with
CPU or disk offload, ``cpu_offload``, ``disk_offload``) keeps offloaded weights on
the meta device behind an ``AlignDevicesHook``. Each work unit's weights are
brought in with accelerate's own ``align_module_device`` for the fit and released
after it (:func:`onloaded`, from :mod:`mp_plugin.layers.offload`), and
:class:`LayerWeights` does the same one layer at a time for the budget, so a model
larger than memory can be planned. ``mp_plugin.apply`` prunes such a model too (any
projection, calibration and ``restore``; not ``permute``): one layer at a time it
brings the weight in, prunes it as in memory and writes it back to accelerate's
offload store (:func:`mp_plugin.layers.offload.write_back`), so the pruned weight
stays offloaded and the model's next forward uses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mp_plugin.errors import MPPluginError, SpectrumFitError
from mp_plugin.layers.discovery import TargetLayer
from mp_plugin.layers.offload import is_offloaded as _offloaded
from mp_plugin.layers.offload import onloaded
from mp_plugin.progress import progress
from mp_plugin.spectrum import SpectralFit, fit_many
from mp_plugin.spectrum.eigen import resolve_gram_dtype

__all__ = ["WorkUnit", "work_units", "fit_target_layers", "onloaded", "LayerWeights"]

WorkUnit = list[int]
UNIT_BYTES = 1 << 25  # Gram bytes of one work unit: 32 MiB keeps plan within weights + 1 GB on 1.1 B


class LayerWeights(Sequence[torch.Tensor]):
    """The target layers' weights as a sequence; an offloaded weight is brought in (a copy) as it is read.

    ``len`` and shapes never load anything; iterating loads one layer at a time.
    """

    def __init__(self, targets: Sequence[TargetLayer]) -> None:
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def numels(self) -> list[int]:
        """Each layer's number of weights, read from the parameter's shape (nothing is loaded)."""
        return [int(t.weight.numel()) for t in self.targets]

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        module = self.targets[i].module
        if not _offloaded(module):
            return module.weight
        with onloaded([module]):
            return module.weight.detach().clone()


def work_units(
    targets: Sequence[TargetLayer], todo: Sequence[int], gram_dtype: torch.dtype, max_batch_bytes: int = UNIT_BYTES
) -> list[WorkUnit]:
    """Indices of ``todo`` cut into units of one (shape, device) whose Gram matrices fit ``max_batch_bytes``.

    Units appear in module order of their first layer; at most 16 layers per unit.
    """
    itemsize = torch.empty(0, dtype=gram_dtype).element_size()
    by_shape: dict[tuple, list[int]] = {}
    for i in todo:
        by_shape.setdefault((targets[i].shape, targets[i].weight.device), []).append(i)
    units: list[WorkUnit] = []
    for (shape, _), idx in by_shape.items():
        size = max(1, min(16, int(max_batch_bytes) // max(1, min(shape) ** 2 * itemsize)))
        units.extend(idx[s : s + size] for s in range(0, len(idx), size))
    return sorted(units, key=lambda u: u[0])


def _unit_cost(targets: Sequence[TargetLayer], unit: WorkUnit) -> float:
    """Flops of the unit's Gram products and eigen-solves: Σ p²·n + p³ (arbitrary units)."""
    p, n = sorted(targets[unit[0]].shape)
    return len(unit) * (p * p * n + p**3)


def _assign(costs: Sequence[float], world: int) -> list[int]:
    """Greedy longest-first assignment of units to ``world`` ranks; returns each unit's rank."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for u in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[u] = r
        load[r] += costs[u]
    return owner


def fit_target_layers(
    targets: Sequence[TargetLayer],
    alpha: float = 0.25,
    beta: float = 0.8,
    estimator: str = "bema-debiased",
    edge_compat: str = "correct",
    gram_dtype: torch.dtype | str = "float32",
    float32_sigma_rtol: float | None = 1e-6,
    show_progress: bool = False,
    reuse: Mapping[str, SpectralFit] | None = None,
    distributed: bool = False,
    process_group: object | None = None,
    max_batch_bytes: int = UNIT_BYTES,
) -> tuple[list[SpectralFit | None], list[str]]:
    """Fit MP to every target layer, one bounded work unit at a time.

    Args:
        targets: from :func:`mp_plugin.find_target_layers`.
        alpha, beta, estimator, edge_compat: see :func:`mp_plugin.spectrum.fit_from_eigenvalues`.
        gram_dtype, float32_sigma_rtol: see :func:`mp_plugin.spectrum.fit_many`.
        show_progress: a tqdm bar over this rank's layers.
        reuse: ``{layer name: fit}`` of unchanged weights; a layer whose name matches and
            whose matrix holds the fitted shape (all-zero rows/columns dropped) is not refitted.
        distributed: share the units among the ranks of ``process_group`` (default:
            the world) and gather the fits; needs ``torch.distributed`` initialised.
        process_group: a ``torch.distributed`` group, or None for the default group.
        max_batch_bytes: Gram bytes of one work unit (one layer is always allowed).

    Returns:
        ``(fits, notes)`` aligned with ``targets``: a fit, or None with a note saying
        why the MP law could not be fitted (e.g. a 1×n matrix).
    """
    dtype = resolve_gram_dtype(gram_dtype)
    fits: list[SpectralFit | None] = [None] * len(targets)
    notes = [""] * len(targets)
    reuse = reuse or {}
    todo = []
    for i, t in enumerate(targets):
        prev = reuse.get(t.name)
        # a fit drops all-zero rows/columns, so its shape may be smaller than the layer's
        if prev is not None and prev.shape[0] <= t.shape[0] and prev.shape[1] <= t.shape[1]:
            fits[i] = prev
        else:
            todo.append(i)
    units = work_units(targets, todo, dtype, max_batch_bytes)
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MPPluginError("distributed=True needs an initialised torch.distributed process group (torchrun)")
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    owner = _assign([_unit_cost(targets, u) for u in units], world) if world > 1 else [0] * len(units)
    mine = [u for u, r in zip(units, owner) if r == rank]
    local: dict[int, tuple[SpectralFit | None, str]] = {}
    failure: MPPluginError | None = None
    bar = progress(total=sum(len(u) for u in mine), desc="MP fit", unit="layer", disable=not show_progress)
    for unit in mine:
        try:
            with onloaded([targets[i].module for i in unit]):
                res = fit_many(
                    [targets[i].weight for i in unit], alpha, beta, estimator, edge_compat, dtype, float32_sigma_rtol
                )
            local.update({i: (r, "") for i, r in zip(unit, res)})
        except SpectrumFitError as exc:
            local.update({i: (None, f"no MP fit: {exc}") for i in unit})
        except MPPluginError as exc:  # e.g. a NaN weight: every rank must hear of it, not wait in the gather
            if world == 1:
                raise
            failure = exc
            break
        bar.update(len(unit))
    bar.close()
    if world > 1:
        import torch.distributed as dist

        gathered: list[tuple[dict, MPPluginError | None] | None] = [None] * world
        dist.all_gather_object(gathered, (local, failure), group=process_group)
        errors = [part[1] for part in gathered if part is not None and part[1] is not None]
        if errors:
            raise errors[0]
        local = {i: v for part in gathered if part is not None for i, v in part[0].items()}
    for i, (fit, note) in local.items():
        fits[i], notes[i] = fit, note
    return fits, notes
