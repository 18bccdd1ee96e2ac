"""Apply a :class:`~mp_plugin.plan.PrunePlan` to a model, and report sparsity.

``apply(model, plan)`` prunes in place, layer by layer, to the plan's patterns:

* ``unstructured``: exactly ``n_prune`` smallest-|W| weights of the layer become 0
  (the plan's SEB/global budget);
* ``k:n``: the magnitude k:n mask, or the CAST projection (``method="cast"``)
  from calibration covariances, optionally with the Hamming prior towards the
  layer's unstructured mask;
* ``dense``: untouched.

The result is an ordinary model: dense weight tensors with exact zeros, no
parametrizations, hooks, extra state_dict keys or attributes. What was done is
recorded in ``plan.applied`` (the channel permutation, if any, in
``plan.applied["permutation"]``), so it travels with the plan, not the model. A layer that already satisfies its pattern is left as it is,
so a second call is a no-op.

A model offloaded by Hugging Face ``accelerate`` (``cpu_offload``, ``disk_offload``,
``dispatch_model`` with a ``device_map`` sending modules to ``"cpu"``/``"disk"``) is pruned
one layer at a time: the layer's weight is brought in with accelerate's
``align_module_device``, masked (and restored) exactly as in memory, written back to
accelerate's offload store (its CPU dict or the ``.dat`` files of its offload folder,
:func:`mp_plugin.layers.offload.write_back`) and released, so the weight is on the meta
device again and the next forward loads the pruned weight. Calibration runs through the
model's own hooks. Only ``permute`` is refused on an offloaded model.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import ConfigError, MPPluginError, PatternError, PlanFormatError, PlanMismatchError
from mp_plugin.layers.calibration import capture_covariances, first_batch
from mp_plugin.layers.offload import onloaded
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.masks.cast import CastConfig, cast_project, cast_source
from mp_plugin.masks.select import assert_kn_exact, check_nm, nm_mask, unstructured_mask
from mp_plugin.planning.plan import PrunePlan
from mp_plugin.progress import progress
from mp_plugin.pruning.checks import check_apply_inputs, undo_permutations_on_error
from mp_plugin.restore import LayerTask, RestoreConfig, prune_and_restore, resolve_restore

__all__ = ["apply", "sparsity_report", "SparsityReport", "LayerSparsity", "MASK_METHODS"]

MASK_METHODS = ("magnitude", "cast", "obs", "cast-obs")


def _check_shared(modules: dict[str, nn.Module]) -> None:
    seen: dict[int, str] = {}
    for name, mod in modules.items():
        key = id(mod.weight)
        if key in seen:
            raise PlanMismatchError(
                f"plan layers {seen[key]!r} and {name!r} share one weight; keep one of them in the plan"
            )
        seen[key] = name


def _already_done(weight: torch.Tensor, pattern: Pattern, n_prune: int) -> bool:
    if pattern.is_kn:
        return check_nm(weight, pattern.k, pattern.n)
    return int((weight == 0).sum()) >= n_prune


def _permute(model: nn.Module, plan: PrunePlan, method: str, example: Any = None, show_progress: bool = False) -> Any:
    """Fold a permutation for the plan's most common k:n pattern; the record composes with the plan's."""
    from mp_plugin.permute import PermutationRecord, permute_channels

    kn = [Pattern.parse(lp.pattern) for lp in plan.layers if Pattern.parse(lp.pattern).is_kn]
    if not kn:
        raise PatternError("permutation only helps k:n patterns; the plan has no k:n layer")
    pattern = max(set(kn), key=kn.count)
    return permute_channels(
        model,
        pattern=str(pattern),
        method=method,
        example_input=example,
        show_progress=show_progress,
        record=PermutationRecord.from_plan(plan),
    )


def default_projection(restore: Any = None) -> str:
    """The k:n projection ``apply`` uses when none is given: ``"cast-obs"`` with restore, else ``"magnitude"``.

    The CLI (``prune --projection``) and the torchao and ModelOpt adapters share this default.
    """
    return "cast-obs" if resolve_restore(restore) is not None else "magnitude"


def apply(
    model: nn.Module,
    plan: PrunePlan,
    calibration: Any = None,
    projection: str | None = None,
    prior_alpha: float = 0.0,
    show_progress: bool = False,
    permute: bool | str = False,
    cast_config: CastConfig | None = None,
    max_calibration_rows: int = 4096,
    restore: bool | RestoreConfig | dict | None = False,
    *,
    method: str | None = None,
) -> nn.Module:
    """Prune ``model`` in place to ``plan`` and return it.

    Args:
        model: the model the plan was made for (same layer names and weight shapes); a
            wrapped model (``torch.compile``, DDP, …) is pruned through the model inside it.
            A model offloaded by Hugging Face ``accelerate`` (CPU or disk offload) is pruned
            one layer at a time and its pruned weights are written back to accelerate's
            offload store, so they stay offloaded (on the meta device between forwards) and
            the next forward uses them; this holds for every projection, calibration and
            ``restore`` (but not ``permute``).
        plan: a :class:`PrunePlan`; ``plan.applied`` is filled in.
        calibration: a batch or list of batches (tensor → ``model(x)``, tuple →
            ``model(*x)``, dict → ``model(**x)``); needed for ``projection="cast"``.
        projection: mask projection: ``"magnitude"``, ``"cast"`` (CAST, k:n only), ``"obs"``
            (SparseGPT's Hessian-aware selection inside the column sweep) or ``"cast-obs"``
            (CAST with the compensated cost w_Pᵀ[(H⁻¹)_PP]⁻¹w_P; unstructured layers:
            smallest w²/[H⁻¹]ⱼⱼ). ``"magnitude"`` and ``"cast"`` prune unstructured layers
            by smallest |W|. Every projection keeps the plan's exact counts. Default:
            ``"magnitude"``, or ``"cast-obs"`` with ``restore`` (with restore it was best or
            second best at 2:4 on every model measured, ``benchmarks/README.md``).
        prior_alpha: CAST Hamming-prior weight α towards the layer's unstructured
            mask (overrides ``cast_config.prior_alpha`` when non-zero).
        show_progress: tqdm bar over layers.
        permute: ``False``/``"none"``, ``True`` (= ``"swap"``), ``"swap"`` or
            ``"interleave"``: permute input channels (folded into the weights) with
            ``mp_plugin.permute_channels`` before masking. The first calibration batch,
            when given, is its example input: it lets the search verify couplings
            across modules fx cannot trace (e.g. Hugging Face BERT's FFN). What was folded
            is stored in ``plan.applied["permutation"]`` (composed with an earlier record
            there); ``certify(..., plan=plan)`` aligns the dense model with it.
        cast_config: further CAST settings (:class:`~mp_plugin.masks.cast.CastConfig`).
        max_calibration_rows: input rows per layer for CAST covariances (without restore).
        restore: ``True`` or a :class:`~mp_plugin.restore.RestoreConfig` (or its dict):
            after each layer's mask is chosen, re-solve its kept weights so the layer's
            output on ``calibration`` stays as close to the dense output as the mask
            allows (ALGORITHM.md §7); ``RestoreConfig(sequential=True)`` takes each
            block's inputs from the model already pruned and restored before it.
            Each layer's relative reconstruction error before and after is recorded
            in ``plan.applied["layers"][name]["restore"]``.
        method: deprecated name of ``projection`` (DeprecationWarning).

    Returns:
        ``model`` itself, pruned (dense tensors with exact zeros).

    Raises:
        PlanMismatchError: the model lacks a plan layer, a shape differs, or two
            plan layers share one weight.
        PatternError: a k:n layer's input size is not divisible by n.
        MPPluginError: unknown method, or CAST without calibration data.
        ConfigError: ``permute`` asked of an accelerate-offloaded model.
    """
    if method is not None:
        warnings.warn("apply(method=...) is deprecated: use projection=...", DeprecationWarning, stacklevel=2)
        projection = method
    if projection is None:
        projection = default_projection(restore)
    method = projection  # the plan's budget method decided the counts; this is only the projection
    if method not in MASK_METHODS:
        raise MPPluginError(f"unknown projection {method!r}; use one of {MASK_METHODS}")
    check_apply_inputs(model, plan, calibration, prior_alpha, permute, cast_config, max_calibration_rows)
    model_in, model = model, unwrap_model(model)
    modules = plan.check_model(model)
    _check_shared(modules)
    patterns = {lp.name: Pattern.parse(lp.pattern) for lp in plan.layers}
    for lp in plan.layers:
        pat = patterns[lp.name]
        if not pat.eligible(tuple(modules[lp.name].weight.shape)):
            raise PatternError(
                f"layer {lp.name!r}: input channels {modules[lp.name].weight.shape[1]} are not divisible by n={pat.n}"
            )
    cfg = cast_config or CastConfig()
    if prior_alpha:
        cfg = CastConfig(**{**asdict(cfg), "prior_alpha": float(prior_alpha)})

    perm_method = "swap" if permute is True else (permute or "none")
    permuted, new_folds = None, []  # bad calibration after folding: undo, leave the model as it was
    if perm_method != "none":
        before = len((plan.permutation or {}).get("folds", []))
        permuted = _permute(model, plan, perm_method, first_batch(calibration), show_progress)
        new_folds = permuted.folds[before:]

    todo = set()
    for lp in plan.layers:
        if patterns[lp.name].kind != "dense":
            with onloaded([modules[lp.name]]):  # an accelerate-offloaded weight: one layer at a time
                if not _already_done(modules[lp.name].weight.detach(), patterns[lp.name], lp.n_prune):
                    todo.add(lp.name)
    restore_cfg = resolve_restore(restore)
    stats: dict = {}
    driven: dict[str, dict] = {}
    if restore_cfg is not None or method in ("obs", "cast-obs"):
        tasks = [
            LayerTask(lp.name, modules[lp.name], patterns[lp.name], lp.n_prune) for lp in plan.layers if lp.name in todo
        ]
        partial: dict[str, dict] = {}
        try:
            with undo_permutations_on_error(model, new_folds, keep=lambda: bool(partial)):
                driven = prune_and_restore(
                    model,
                    tasks,
                    calibration,
                    method,
                    restore_cfg,
                    cfg if method == "cast" else None,
                    show_progress,
                    records=partial,
                )
        except BaseException as exc:  # Ctrl-C included: a long run interrupted resumes like a failed one
            if partial:  # a run stopped part-way: say what is done, so a second apply resumes
                _record_incomplete(plan, partial, patterns, permuted, exc, len(tasks))
            raise
    elif method == "cast":
        kn_layers = {lp.name: patterns[lp.name].n for lp in plan.layers if lp.name in todo and patterns[lp.name].is_kn}
        with undo_permutations_on_error(model, new_folds):
            if kn_layers and calibration is None:
                raise MPPluginError("method='cast' needs calibration data (a batch of model inputs)")
            if kn_layers:
                stats = capture_covariances(
                    model, kn_layers, calibration, max_rows=max_calibration_rows, show_progress=show_progress
                )

    layer_log: dict[str, dict] = dict(plan.applied.get("layers", {}))
    zeros = 0
    bar = progress(plan.layers, desc="prune", unit="layer", disable=not show_progress or bool(driven))
    for lp in bar:
        pat = patterns[lp.name]
        module = modules[lp.name]
        entry: dict[str, Any] = {"pattern": str(pat)}
        if pat.kind != "dense" and lp.name not in todo:  # done earlier: keep what was recorded (restore, …)
            entry = {**layer_log.get(lp.name, {}), **entry}
        prune_here = lp.name in todo and lp.name not in driven
        # an accelerate-offloaded layer is brought in, pruned, and its pruned weight written back to the store
        with onloaded([module], write=prune_here):
            weight = module.weight
            if pat.kind == "dense":
                entry["method"] = "dense"
            elif lp.name not in todo:
                entry["method"] = layer_log.get(lp.name, {}).get("method", "already pruned")
            elif lp.name in driven:
                entry.update(driven[lp.name])
            elif pat.kind == "unstructured":
                mask = unstructured_mask(weight, lp.n_prune)
                entry["method"] = "magnitude"
                _write(weight, weight.detach() * mask)
            else:
                entry.update(_project_kn(module, lp.n_prune, pat, method, stats.get(lp.name), cfg))
            w = weight.detach()
            n_zero = int((w == 0).sum())
            entry["sparsity"] = n_zero / w.numel()
            if pat.is_kn:
                entry["kn_valid"] = check_nm(w, pat.k, pat.n)
        zeros += n_zero
        layer_log[lp.name] = entry
    bar.close()

    if not todo and restore_cfg is not None:
        warnings.warn(
            "apply: every layer of the plan is already pruned, so nothing was restored; to re-solve the kept "
            "weights of an already-pruned model use mp.restore_model(model, dense, calibration)",
            stacklevel=2,
        )
    if not todo and "method" in plan.applied:  # nothing pruned now: the record keeps how it was done
        method, restore_cfg = plan.applied["method"], None
        if perm_method == "none":
            perm_method = plan.applied.get("permute", perm_method)
    plan.applied.update(
        {
            "method": method,
            "permute": perm_method,
            "cast": (cfg.to_dict() if method == "cast" else None) if todo else plan.applied.get("cast"),
            "restore": restore_cfg.to_dict() if restore_cfg is not None else plan.applied.get("restore"),
            "calibration_rows": {name: s.rows for name, s in stats.items()} or plan.applied.get("calibration_rows"),
            "layers": layer_log,
            "achieved_sparsity": zeros / max(1, plan.total_weights),
        }
    )
    plan.applied.pop("incomplete", None)  # a resumed run that finished
    if permuted is not None:
        permuted.save_to(plan)
    return model_in


def _record_incomplete(
    plan: PrunePlan, partial: dict[str, dict], patterns: dict, permuted: Any, exc: BaseException, total: int
) -> None:
    """Record the layers a failed run already pruned (and the permutation they were pruned in)."""
    layers = dict(plan.applied.get("layers", {}))
    layers.update({name: {"pattern": str(patterns[name]), **rec} for name, rec in partial.items()})
    plan.applied.update({"layers": layers, "incomplete": f"{type(exc).__name__}: {exc}"})
    if permuted is not None:  # those layers are k:n in the permuted basis: the folds stay and are recorded
        permuted.save_to(plan)
    exc.add_note(
        f"apply stopped after pruning {len(partial)} of {total} layers; plan.applied records them "
        "('incomplete'); apply the same plan again (after fixing the cause of an error) to prune the rest. "
        "The rest then sees its calibration inputs through the layers already pruned (as sequential restore "
        "does), so a one-shot run resumed this way is not bit-identical to an uninterrupted one"
    )


def _write(weight: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        weight.copy_(value.to(weight.dtype))


def _project_kn(
    module: nn.Module, n_prune: int, pat: Pattern, method: str, stats: Any, cfg: CastConfig
) -> dict[str, Any]:
    weight = module.weight
    dense = weight.detach()
    if method == "magnitude" or stats is None:
        mask = nm_mask(dense, pat.k, pat.n)
        assert_kn_exact(mask, pat.k, pat.n, name="k:n mask")
        _write(weight, dense * mask)
        return {"method": "magnitude" if method == "magnitude" else "magnitude (layer not reached by calibration)"}
    need_prior = cfg.prior_alpha > 0 or cfg.source == "ser"
    prior = unstructured_mask(dense, n_prune) if need_prior else None
    u = cast_source(dense, prior, cfg.source, cfg.free_restoration)
    mask = cast_project(u, stats, pat.k, pat.n, prior_mask=prior, config=cfg, conv_groups=getattr(module, "groups", 1))
    _write(weight, u * mask)
    return {"method": "cast", "calibration_rows": stats.rows}


# --------------------------------------------------------------------------- report


@dataclass
class LayerSparsity:
    """Sparsity of one layer.

    Attributes:
        name: module name; shape: weight shape; numel: weights; zeros: exact zeros.
        pattern: the plan's pattern for the layer ("" without a plan).
        kn_valid: for k:n patterns, whether every group has ≤ k non-zeros (None otherwise).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    pattern: str = ""
    kn_valid: bool | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of zeros."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Per-layer and total sparsity of a model's Linear/Conv weights.

    Attributes:
        layers: one :class:`LayerSparsity` per layer.
    """

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total_numel(self) -> int:
        """Weights over all reported layers."""
        return sum(layer.numel for layer in self.layers)

    @property
    def total_zeros(self) -> int:
        """Exact zeros over all reported layers."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def total_sparsity(self) -> float:
        """Fraction of zeros over all reported layers."""
        return self.total_zeros / self.total_numel if self.total_numel else 0.0

    @property
    def kn_valid(self) -> bool:
        """True when every k:n layer satisfies its pattern."""
        return all(layer.kn_valid is not False for layer in self.layers)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "total_numel": self.total_numel,
            "total_zeros": self.total_zeros,
            "total_sparsity": self.total_sparsity,
            "kn_valid": self.kn_valid,
            "layers": [
                {**asdict(layer), "shape": list(layer.shape), "sparsity": layer.sparsity} for layer in self.layers
            ],
        }

    def to_table(self, max_rows: int | None = None) -> str:
        """Fixed-width text: one row per layer plus a total line (``max_rows`` ≥ 0 or None = all)."""
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
            raise MPPluginError(f"max_rows must be a non-negative integer or None, got {max_rows!r}")
        head = f"{'layer':<48} {'shape':>20} {'sparsity':>9} {'pattern':>12} {'k:n ok':>7}"
        rows = [head, "-" * len(head)]
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        for layer in shown:
            name = layer.name if len(layer.name) <= 48 else "…" + layer.name[-47:]
            shape = "×".join(str(s) for s in layer.shape)
            ok = "-" if layer.kn_valid is None else ("yes" if layer.kn_valid else "NO")
            rows.append(f"{name:<48} {shape:>20} {layer.sparsity:9.4f} {layer.pattern:>12} {ok:>7}")
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append(f"… {len(self.layers) - max_rows} more layers")
        rows.append("-" * len(head))
        rows.append(
            f"total: {self.total_zeros:,} zeros of {self.total_numel:,} weights = {self.total_sparsity:.4f}; "
            f"k:n valid: {'yes' if self.kn_valid else 'NO'}"
        )
        return "\n".join(rows)


def sparsity_report(model: nn.Module, plan: PrunePlan | None = None) -> SparsityReport:
    """Measure the zeros of ``model``'s weights.

    Args:
        model: any model (a wrapped one is read through the model inside it; an
            accelerate-offloaded weight is brought in one layer at a time).
        plan: if given, report exactly the plan's layers and check each k:n
            layer's pattern; otherwise report every Linear/Conv weight (a shared
            weight once).

    Returns:
        A :class:`SparsityReport`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"sparsity_report needs a torch nn.Module, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, PrunePlan):
        raise PlanFormatError(f"sparsity_report: plan must be a PrunePlan or None, got {type(plan).__name__}")
    if plan is not None:
        modules = plan.check_model(model)
        items = [(lp.name, modules[lp.name], Pattern.parse(lp.pattern)) for lp in plan.layers]
    else:
        items = []
        seen: set[int] = set()
        for name, mod in unwrap_model(model).named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(w, torch.Tensor):
                if id(w) not in seen:
                    seen.add(id(w))
                    items.append((name, mod, None))
    layers = []
    for name, mod, pat in items:
        with onloaded([mod]):  # an accelerate-offloaded weight is read one layer at a time
            w = mod.weight.detach()
            valid = check_nm(w, pat.k, pat.n) if pat is not None and pat.is_kn else None
            zeros = int((w == 0).sum())
        layers.append(LayerSparsity(name, tuple(w.shape), int(w.numel()), zeros, str(pat or ""), valid))
    return SparsityReport(layers)
