"""Layer budgets that earn their name (issue 17): bounded MP budgets and the dense/2:4 mix.

Every method prunes a fresh copy of the dense model (``accuracy.py``'s tasks:
MiniLM, EfficientNet-Lite0, the Fashion-MNIST CNN) with the same projection
(smallest |W| inside each layer), so only the per-layer budget differs. Loss =
1 − embedding cosine (MiniLM) or KL(dense ‖ pruned) (classifiers), per
evaluation sample; each row also gives its paired difference to global
magnitude in the same setting and the standard error of that difference over
the evaluation samples (the methods are deterministic; the SE is the noise of
the evaluation set, which the "better by more than the spread" test uses).

Unstructured 50/60/70 %: uniform, global magnitude, SEB (paper), ``alpha``,
``bounded-bulk-energy``, ``bounded-spikes``, ``bounded-edge``, OWL (calibration
baseline), ``noise-floor`` (calibration) and the sensitivity oracle of
``budget_diagnosis.py`` (measured single-layer sensitivity, w = exp(−z)),
each without and with prune–restore (one-shot).

Dense/2:4 mix 25/35/45 %: the layers that take 2:4 are chosen by the default MP
rule ``mp-bulk`` (2:4 removed energy in the units of the mp-bulk weights, β = 0.25, with
β = 0.5 and 1 as extra rows), the older MP
rules (2:4 removed energy over MP noise energy; spike energy share), size, the
global-magnitude and mp-bulk budgets, measured single-layer 2:4 sensitivity (in-sample, on
the evaluation set) and the library's ``measured`` and ``measured-restore`` rules (the same
measurement on the calibration data, relative output error; the second after restoring the
layer, ``RestoreConfig()``), at
equal removed weights and at equal sparse-execution MACs (``mp_plugin.masks.macs``),
without and with restore. ``--parts mix`` reruns only the mix and merges it into the
stored results.

Usage::

    python benchmarks/budgets.py --models fmnist_cnn efficientnet_lite0 minilm --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import TASKS, Task, minilm_task  # noqa: E402
from budgets_report import (  # noqa: E402
    BETA_SWEEP,
    BUDGETS,
    MIX_RULES,
    correlation_markdown,
    load_results,
    mix_verdict_markdown,
    to_markdown,
    verdict_markdown,
    write_readme,
)
from common import RESULTS, machine, versions, write_result  # noqa: E402

from mp_plugin.budget.bounded import BoundedConfig  # noqa: E402
from mp_plugin.budget.bulk_share import BulkShareConfig  # noqa: E402
from mp_plugin.budget.calibrated import noise_floor_curves  # noqa: E402
from mp_plugin.budget.mix import CALIBRATED_MIX_RULES, kn_noise_ratio  # noqa: E402
from mp_plugin.layers.patterns import Pattern  # noqa: E402
from mp_plugin.masks.counts import global_prune_counts  # noqa: E402
from mp_plugin.masks.macs import count_macs  # noqa: E402
from mp_plugin.masks.select import nm_mask, unstructured_mask  # noqa: E402
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan  # noqa: E402
from mp_plugin.pruning.apply_plan import apply  # noqa: E402
from mp_plugin.restore import RestoreConfig  # noqa: E402

UNSTRUCTURED = (0.5, 0.6, 0.7)
MIX = (0.25, 0.35, 0.45)
README = Path(__file__).resolve().parent / "README.md"


# --------------------------------------------------------------------------- evaluation


class _Recorder:
    """Forward hook on the root module: collects every output of an evaluation pass."""

    def __init__(self) -> None:
        self.outs: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]
        self.outs.append(out.detach().float().cpu())


def evaluate(task: Task, model: torch.nn.Module) -> tuple[dict[str, float], torch.Tensor]:
    """The task's metrics and the per-sample outputs (from the same forward passes)."""
    rec = _Recorder()
    handle = model.register_forward_hook(rec)
    try:
        metrics = task.evaluate(model)
    finally:
        handle.remove()
    return metrics, torch.cat(rec.outs)


def per_sample_loss(task: Task, dense: torch.Tensor, out: torch.Tensor) -> np.ndarray:
    """1 − cosine per text (MiniLM) or KL(dense ‖ pruned) per image."""
    if task.name == "minilm":
        return (1.0 - F.cosine_similarity(out, dense, dim=-1)).numpy().astype(np.float64)
    ld, lp = F.log_softmax(dense, -1), F.log_softmax(out, -1)
    return (ld.exp() * (ld - lp)).sum(-1).numpy().astype(np.float64)


# --------------------------------------------------------------------------- helpers


def _prune_alone(task: Task, name: str, kn: bool) -> torch.nn.Module:
    m = copy.deepcopy(task.model)
    w = dict(m.named_modules())[name].weight
    with torch.no_grad():
        mask = nm_mask(w, 2, 4) if kn else unstructured_mask(w, w.numel() // 2)
        w.mul_(mask.to(w.dtype))
    return m


def sensitivities(task: Task, names: list[str], dense_out: torch.Tensor, kn: bool) -> dict[str, float]:
    """Loss when only that layer is pruned to 50 % (smallest |W|) or to magnitude 2:4."""
    out = {}
    for name in names:
        if kn and not Pattern.parse("2:4").eligible(tuple(dict(task.model.named_modules())[name].weight.shape)):
            continue
        _, o = evaluate(task, _prune_alone(task, name, kn))
        out[name] = float(per_sample_loss(task, dense_out, o).mean())
    return out


def stored_sensitivity(task: Task, names: list[str]) -> dict[str, float] | None:
    """The 50 % single-layer sensitivities of ``budget_diagnosis.json`` when they cover these layers."""
    path = RESULTS / "budget_diagnosis.json"
    if not path.exists():
        return None
    for r in json.loads(path.read_text()).get("models", []):
        if r["model"] == task.name:
            sens = {x["name"]: x["sensitivity"] for x in r["layers"]}
            if set(names) <= set(sens):
                return {n: sens[n] for n in names}
    return None


def oracle_plan(base: PrunePlan, model: torch.nn.Module, s: float, sens: dict[str, float]) -> PrunePlan:
    """budget_diagnosis's oracle: w_ℓ = exp(−z_ℓ) of the standardised log sensitivity, exact global threshold."""
    p = copy.deepcopy(base)
    z = np.log(np.maximum(np.asarray([sens[lp.name] for lp in p.layers]), 1e-12))
    z = (z - z.mean()) / (z.std() + 1e-12)
    mods = dict(model.named_modules())
    counts = global_prune_counts([mods[lp.name].weight for lp in p.layers], np.exp(-z).tolist(), s)
    for lp, c in zip(p.layers, counts):
        lp.n_prune, lp.unstructured_budget, lp.sparsity, lp.pattern = c, c / lp.numel, c / lp.numel, "unstructured"
    p.sparsity, p.method = s, "oracle"
    return p


def layer_macs(task: Task) -> tuple[dict[str, float], int]:
    """Dense MACs of each target layer and of the whole forward, on one calibration batch."""
    batch = task.calibration[0]
    if isinstance(batch, dict):
        mc = count_macs(lambda: task.model(**batch), (), pattern="dense", modules=task.model)
    else:
        mc = count_macs(task.model, batch, pattern="dense")
    return {lm.name: float(lm.dense) for lm in mc.layers}, int(mc.dense)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ over the finite pairs (ranks by argsort; NaN with fewer than 3 pairs)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x[ok])), np.argsort(np.argsort(y[ok]))
    return float(np.corrcoef(rx, ry)[0, 1])


def signal_correlations(base: PrunePlan, model: torch.nn.Module, sens: dict[str, dict[str, float]]) -> dict:
    """Spearman ρ between each per-layer MP signal and the measured single-layer sensitivity.

    ``sens``: {"50%": {layer: loss}, "2:4": {layer: loss}}. Positive ρ: layers with more
    of the signal are more sensitive. The signals are those the budget rules use.
    """
    mods = dict(model.named_modules())
    signals = {
        "bulk energy share (mp-bulk)": lambda lp: 1.0 - lp.fit.spike_energy_fraction,
        "spikes per dimension": lambda lp: lp.fit.n_spikes / min(lp.fit.shape),
        "Hill alpha": lambda lp: lp.fit.hill_alpha,
        "2:4 energy / MP noise": lambda lp: kn_noise_ratio(mods[lp.name].weight, lp.fit),
        "weights": lambda lp: float(lp.numel),
    }
    out: dict[str, dict[str, float]] = {}
    for sig, fn in signals.items():
        x = np.asarray([fn(lp) if lp.fit is not None else np.nan for lp in base.layers], dtype=np.float64)
        for key, per_layer in sens.items():
            y = np.log(np.maximum([per_layer.get(lp.name, np.nan) for lp in base.layers], 1e-12))
            out.setdefault(sig, {})[key] = _spearman(x, y)
    return out


# --------------------------------------------------------------------------- the benchmark


def bench(task: Task, restore_cfg: RestoreConfig, parts: tuple[str, ...]) -> dict:
    """All rows for one model."""
    t0 = time.perf_counter()
    dense_metrics, dense_out = evaluate(task, copy.deepcopy(task.model))
    base = plan(task.model, 0.5, "unstructured", "magnitude")
    names = [lp.name for lp in base.layers]
    numel = {lp.name: lp.numel for lp in base.layers}
    total = sum(numel.values())
    print(f"[{task.name}] dense {dense_metrics}; {len(names)} layers, {total:,} weights", flush=True)

    sens = stored_sensitivity(task, names)
    sens_source = "benchmarks/results/budget_diagnosis.json"
    if sens is None:
        sens, sens_source = sensitivities(task, names, dense_out, kn=False), "measured here"
    t1 = time.perf_counter()
    bcfg = BoundedConfig()
    curves = {}
    if "unstructured" in parts:  # the calibrated budgets need them; the mix does not
        curves = noise_floor_curves(task.model, names, task.calibration, bcfg.noise_grid, bcfg.noise_rows)
    bcfg.noise_curves = curves
    cfg = PlanConfig(bounded=bcfg)
    t_curves = time.perf_counter() - t1
    print(f"[{task.name}] noise-floor curves {t_curves:.1f}s", flush=True)

    rows: list[dict] = []
    ref: dict[tuple, np.ndarray] = {}

    def run(part: str, setting: str, label: str, p: PrunePlan, restore: bool, key: tuple, is_ref: bool) -> dict:
        t = time.perf_counter()
        m = copy.deepcopy(task.model)
        if restore:
            apply(m, p, calibration=task.calibration, restore=restore_cfg)
        else:
            apply(m, p)
        metrics, out = evaluate(task, m)
        loss = per_sample_loss(task, dense_out, out)
        if is_ref:
            ref[key] = loss
        row: dict[str, Any] = {
            "part": part,
            "setting": setting,
            "method": label,
            "budget": p.method,
            "restore": restore,
            "loss": float(loss.mean()),
            **metrics,
            "removed_fraction": sum(lp.sparsity * lp.numel for lp in p.layers) / total,
            "seconds": time.perf_counter() - t,
        }
        if key in ref and not is_ref:
            diff = loss - ref[key]
            row["delta_vs_reference"] = float(diff.mean())
            row["se_delta"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
        rows.append(row)
        print(
            f"[{task.name}] {part:<5} {setting:>4} restore={int(restore)} {label:<28} loss={row['loss']:.5f} "
            f"Δ={row.get('delta_vs_reference', 0.0):+.5f}±{row.get('se_delta', 0.0):.5f} "
            f"removed={row['removed_fraction']:.3f} ({row['seconds']:.1f}s) load={os.getloadavg()[0]:.1f}",
            flush=True,
        )
        return row

    budgets_by_setting: dict[str, dict[str, dict[str, float]]] = {}
    if "unstructured" in parts:
        for s in UNSTRUCTURED:
            setting = f"{int(100 * s)}%"
            plans = []
            for label, budget in BUDGETS:
                if budget is None:
                    p = oracle_plan(base, task.model, s, sens)
                else:
                    p = plan(task.model, s, "unstructured", budget, cfg, reuse_fits=base, calibration=task.calibration)
                plans.append((label, p))
                if budget == "mp-bulk":  # its one parameter, swept: β was picked on these models
                    for beta in BETA_SWEEP:
                        bc = copy.copy(cfg)
                        bc.bulk_share = BulkShareConfig(beta=beta)
                        pb = plan(task.model, s, "unstructured", budget, bc, reuse_fits=base)
                        pb.method = f"mp-bulk beta={beta}"
                        plans.append((f"mp-bulk, β = {beta}", pb))
                        budgets_by_setting.setdefault(setting, {})[plans[-1][0]] = {
                            lp.name: lp.unstructured_budget for lp in pb.layers
                        }
                budgets_by_setting.setdefault(setting, {})[label] = {lp.name: lp.unstructured_budget for lp in p.layers}
            plans.sort(key=lambda lp_: lp_[1].method != "magnitude")  # the reference first
            for restore in (False, True):
                for label, p in plans:
                    run("unstr", setting, label, p, restore, (setting, restore), p.method == "magnitude")

    macs, total_macs = layer_macs(task)
    mix_info: dict[str, Any] = {"total_macs": total_macs, "target_layer_macs": sum(macs.values())}
    if "mix" in parts:
        kn_sens = sensitivities(task, names, dense_out, kn=True)
        mix_info["kn_sensitivity"] = kn_sens
        for s in MIX:
            setting = f"{int(100 * s)}%"
            for equal in ("weights", "macs"):
                seen: dict[tuple, str] = {}
                for label, rule, mix_budget, *beta in sorted(
                    MIX_RULES, key=lambda x: x[1] != "size"
                ):  # reference first
                    mcfg = PlanConfig(
                        auto_patterns=("dense", "2:4"),
                        mix_rule=rule,
                        mix_scores=kn_sens if rule == "scores" else None,
                        mix_costs=macs if equal == "macs" else None,
                        bulk_share=BulkShareConfig(mix_beta=beta[0]) if beta else BulkShareConfig(),
                    )
                    calib = task.calibration if rule in CALIBRATED_MIX_RULES else None
                    p = plan(task.model, s, "auto", mix_budget, mcfg, reuse_fits=base, calibration=calib)
                    chosen = tuple(lp.pattern == "2:4" for lp in p.layers)
                    saved = sum(macs.get(lp.name, 0.0) / 2 for lp in p.layers if lp.pattern == "2:4")
                    full = f"{label} [equal {equal}]"
                    for restore in (False, True):
                        if chosen in seen:
                            prev = next(
                                r
                                for r in rows
                                if r["part"] == "mix"
                                and r["setting"] == setting
                                and r["method"] == seen[chosen]
                                and r["restore"] == restore
                            )
                            rows.append({**prev, "method": full, "same_layers_as": seen[chosen]})
                            continue
                        r = run("mix", setting, full, p, restore, ("mix", setting, equal, restore), rule == "size")
                        r["equal"] = equal
                        r["n_24_layers"] = sum(chosen)
                        r["saved_mac_fraction"] = saved / total_macs
                        r["layers_24"] = [lp.name for lp in p.layers if lp.pattern == "2:4"]
                    seen.setdefault(chosen, full)
    measured = {"50%": sens, **({"2:4": mix_info["kn_sensitivity"]} if "kn_sensitivity" in mix_info else {})}
    return {
        "model": task.name,
        "signal_vs_sensitivity": signal_correlations(base, task.model, measured),
        "loss": "1 - embedding cosine" if task.name == "minilm" else "KL(dense || pruned)",
        "dense": dense_metrics,
        "layers": names,
        "numel": numel,
        "sensitivity_50": sens,
        "sensitivity_source": sens_source,
        "noise_levels_and_curves": {
            "grid": list(bcfg.noise_grid),
            "curves": {k: v.tolist() for k, v in curves.items()},
        },
        "noise_curve_seconds": t_curves,
        "budgets": budgets_by_setting,
        "mix": mix_info,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "restore_config": restore_cfg.to_dict(),
        "seconds": time.perf_counter() - t0,
        "loadavg_end": list(os.getloadavg()),
    }


def merge_mix(res: dict, path: Path) -> dict:
    """A mix-only run merged into the stored results: the unstructured rows, budgets and curves are kept.

    The mix rows, the 2:4 sensitivities and the signal correlations are this run's; this run's
    machine, versions, date, time and load go under ``mix_run``, the stored ones stay at the top.
    """
    if not path.exists():
        return res
    old = json.loads(path.read_text())
    merged = dict(old)
    merged["rows"] = [r for r in old["rows"] if r["part"] != "mix"] + [r for r in res["rows"] if r["part"] == "mix"]
    merged["mix"] = res["mix"]
    merged["signal_vs_sensitivity"] = res["signal_vs_sensitivity"]
    merged["mix_run"] = {
        "machine": machine(),
        "versions": versions("transformers"),
        **{k: res[k] for k in ("seconds", "threads", "loadavg_end", "settings_note", "restore_config") if k in res},
    }
    return merged


def main(argv: list[str] | None = None) -> None:
    """CLI entry: writes benchmarks/results/budgets-<model>.json and budgets.md (all models present)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models", nargs="+", default=["fmnist_cnn", "efficientnet_lite0", "minilm", "fmnist_mlp"], choices=list(TASKS)
    )
    ap.add_argument("--parts", nargs="+", default=["unstructured", "mix"], choices=["unstructured", "mix"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minilm-calib", type=int, default=120, help="MiniLM calibration glosses")
    ap.add_argument("--solver", default="obs", choices=("auto", "direct", "obs", "cg"), help="restore solver")
    ap.add_argument("--table-only", action="store_true", help="rewrite budgets.md from the stored JSON")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 %% and 35 %% only, results not written")
    ap.add_argument("--write-readme", action="store_true", help="rewrite the generated tables of benchmarks/README.md")
    args = ap.parse_args(argv)
    global UNSTRUCTURED, MIX
    if args.quick:
        UNSTRUCTURED, MIX = (0.5,), (0.35,)
    if not args.table_only:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        for name in args.models:
            task = minilm_task(n_calib=args.minilm_calib) if name == "minilm" else TASKS[name]()
            res = bench(task, RestoreConfig(solver=args.solver), tuple(args.parts))
            res["settings_note"] = (
                f"restore one-shot with solver={args.solver}; MiniLM calibration {args.minilm_calib} glosses; "
                "evaluation sets of accuracy.py"
            )
            if args.quick:
                print(to_markdown([res]) + verdict_markdown([res]))
                continue
            if "unstructured" not in args.parts:
                res = merge_mix(res, RESULTS / f"budgets-{name}.json")
            path = write_result(f"budgets-{name}", res, packages=("transformers",))
            print(f"wrote {path}", flush=True)
    if args.quick:
        return
    results = load_results()
    text = (
        to_markdown(results)
        + "\n### Which budget qualifies as the default\n\n"
        + verdict_markdown(results)
        + "\n### The mix target: default MP choice of 2:4 layers vs size (equal removed weights)\n\n"
        + mix_verdict_markdown(results)
        + "\n### MP signals against measured single-layer sensitivity (Spearman ρ)\n\n"
        + correlation_markdown(results)
    )
    (RESULTS / "budgets.md").write_text(text)
    print(text)
    if args.write_readme:
        write_readme(README, results)
        print(f"rewrote the generated block of {README}")


if __name__ == "__main__":
    main()
