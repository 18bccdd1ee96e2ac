"""Text tables of a :class:`~mp_plugin.planning.plan.PrunePlan`: the per-layer plan and the restore errors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mp_plugin.errors import ConfigError

if TYPE_CHECKING:
    from mp_plugin.planning.plan import PrunePlan

__all__ = ["plan_table", "restore_table"]


def _check_max_rows(max_rows: Any) -> None:
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
        raise ConfigError(f"max_rows must be a non-negative integer or None, got {max_rows!r}")


def plan_table(plan: PrunePlan, max_rows: int | None = None) -> str:
    """A fixed-width text table: one row per layer plus a total line (``max_rows`` ≥ 0 or None = all).

    The restore table (:func:`restore_table`) follows when ``apply(..., restore=...)`` recorded errors.
    """
    _check_max_rows(max_rows)
    head = (
        f"{'layer':<42} {'type':<5} {'shape':>11} {'σ₊':>8} {'spk':>4} {'bulk%':>6} {'μ':>6} {'w':>5} "
        f"{'budget':>7} {'pattern':>12}"
    )
    rows = [head, "-" * len(head)]
    layers = plan.layers if max_rows is None else plan.layers[:max_rows]
    for lp in layers:
        f = lp.fit
        sp = f"{f.sigma_plus:8.3f}" if f else f"{'-':>8}"
        spk = f"{f.n_spikes:4d}" if f else f"{'-':>4}"
        bulk = f"{100 * f.bulk_fraction:6.1f}" if f else f"{'-':>6}"
        mu = f"{f.fit_error:6.3f}" if f and math.isfinite(f.fit_error) else f"{'-':>6}"
        shape = f"{lp.shape[0]}×{lp.shape[1]}"
        name = lp.name if len(lp.name) <= 42 else "…" + lp.name[-41:]
        rows.append(
            f"{name:<42} {lp.layer_type:<5} {shape:>11} {sp} {spk} {bulk} {mu} {lp.w:5.2f} "
            f"{lp.unstructured_budget:7.3f} {lp.pattern:>12}"
        )
    if max_rows is not None and len(plan.layers) > max_rows:
        rows.append(f"… {len(plan.layers) - max_rows} more layers")
    rows.append("-" * len(head))
    rows.append(
        f"{len(plan.layers)} layers, {plan.total_weights:,} weights; method={plan.method} "
        f"pattern={plan.pattern} requested s={plan.sparsity:.3f} planned s={plan.planned_sparsity:.4f}"
    )
    if plan.skipped:
        rows.append(f"{len(plan.skipped)} Linear/Conv layers skipped (see plan.skipped)")
    restore = restore_table(plan, max_rows)
    return "\n".join(rows) + ("\n\n" + restore if restore else "")


def restore_table(plan: PrunePlan, max_rows: int | None = None) -> str:
    """Per-layer relative reconstruction error ‖(Ŵ−W)Xᵀ‖²/‖WXᵀ‖² on the calibration rows,
    masked → restored, as recorded by ``apply(..., restore=...)`` ("" when nothing was restored)."""
    layers = plan.applied.get("layers", {}) if isinstance(plan.applied, dict) else {}
    done = [(n, e["restore"]) for n, e in layers.items() if isinstance(e, dict) and isinstance(e.get("restore"), dict)]
    if not done:
        return ""
    head = f"{'restored layer':<42} {'mask':>10} {'err masked':>11} {'err restored':>13} {'solver':>8} {'rows':>7}"
    out = [head, "-" * len(head)]

    def num(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    for name, rec in done if max_rows is None else done[:max_rows]:
        short = name if len(name) <= 42 else "…" + name[-41:]
        method = str(layers[name].get("method", ""))[:10]
        out.append(
            f"{short:<42} {method:>10} {num(rec.get('rel_error_before', '-')):>11} "
            f"{num(rec.get('rel_error_after', '-')):>13} {str(rec.get('solver', '')):>8} {str(rec.get('rows', '')):>7}"
        )
        notes = rec.get("notes", [])
        for note in notes if isinstance(notes, list) else [notes]:
            out.append(f"    note: {note}")
    if max_rows is not None and len(done) > max_rows:
        out.append(f"… {len(done) - max_rows} more restored layers")
    cfg = plan.applied.get("restore")
    cfg = cfg if isinstance(cfg, dict) else {}
    out.append("-" * len(head))
    out.append(
        f"{len(done)} layers restored (damp={cfg.get('damp')}, solver={cfg.get('solver')}, "
        f"sequential={cfg.get('sequential')}); errors are relative output errors on the calibration rows"
    )
    return "\n".join(out)
