"""The main job: analyse → plan → prune (MP and magnitude) → evaluate → certify → export.

``run_main_job(MainJobConfig())`` runs offline on the built-in default, the
ImageNet-pretrained EfficientNet-Lite0 with real photographs shipped by
matplotlib and scikit-image. Any timm model name or checkpoint and an
ImageFolder directory work too. It writes ``plan.json``, plots, ``results.json``
and the exported ONNX file into ``out`` and returns the results dict.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mp_plugin.budget.rules import DEFAULT_BUDGET
from mp_plugin.errors import ConfigError, MPPluginError
from mp_plugin.evaluation.metrics import batched_outputs, output_fidelity
from mp_plugin.evaluation.model_source import load_named_model, weights_description
from mp_plugin.integrations.plotting import plot_plan
from mp_plugin.planning.build import plan
from mp_plugin.planning.plan import PlanConfig, PrunePlan
from mp_plugin.pruning.apply_plan import apply, sparsity_report
from mp_plugin.restore import RestoreConfig

__all__ = ["MainJobConfig", "Variant", "DEFAULT_VARIANTS", "run_main_job", "select_variants", "variant_slug"]


@dataclass(frozen=True)
class Variant:
    """One pruned model of the comparison: budget method, pattern, k:n projection, permutation."""

    label: str
    method: str
    pattern: str
    projection: str = "magnitude"
    permute: str = "none"
    family: str = "mp"  # "mp" or "baseline"
    restore: bool = False  # prune–restore on the calibration images (sequential, block by block)
    baseline: str | None = None  # a registered baseline (mp_plugin.evaluation.baselines) instead of plan + apply


DEFAULT_VARIANTS = (
    Variant("magnitude 2:4", "magnitude", "2:4", family="baseline"),
    Variant("SparseGPT 2:4 (with update)", "uniform", "2:4", family="baseline", baseline="sparsegpt-obs"),
    Variant("MP 2:4 (SEB+CAST)", "seb", "2:4", projection="cast"),
    Variant("MP 2:4 (SEB+CAST+perm)", "seb", "2:4", projection="cast", permute="swap"),
    Variant("MP 2:4 (CAST-OBS+perm+restore)", "seb", "2:4", projection="cast-obs", permute="swap", restore=True),
    Variant("global magnitude 50%", "magnitude", "unstructured", family="baseline"),
    Variant("MP SEB 50%", "seb", "unstructured"),
    Variant("MP 50% (mp-bulk budget)", "mp-bulk", "unstructured"),
)


@dataclass
class MainJobConfig:
    """Settings of the main job.

    Attributes:
        model: built-in name or timm name; checkpoint: optional weights file.
        num_classes: classifier size for timm names.
        random_init: timm names without a checkpoint: random weights on purpose (default:
            timm's pretrained weights, else :class:`~mp_plugin.evaluation.model_source.WeightsUnavailableError`).
        data: an ImageFolder directory; None = real built-in photographs (random crops).
        n_eval / n_calib: evaluation and calibration images (disjoint crops).
        image_size: input side in pixels.
        sparsity: unstructured budget (also CAST's guide for k:n).
        variants: the pruned models to compare.
        out: output directory.
        certify / export: run the certificate and the ONNX export of the best MP k:n model.
        threads: torch CPU threads (None = leave torch's setting).
    """

    model: str = "efficientnet_lite0"
    checkpoint: str | None = None
    num_classes: int | None = None
    random_init: bool = False
    data: str | None = None
    n_eval: int = 96
    n_calib: int = 32
    image_size: int = 224
    sparsity: float = 0.5
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    out: str = "mp-plugin-out"
    certify: bool = True
    export: bool = True
    plots: bool = True
    threads: int | None = None
    plan_config: PlanConfig = field(default_factory=PlanConfig)


def _inputs(cfg: MainJobConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    from mp_plugin.evaluation.photos import image_folder_batch, real_photo_crops

    if cfg.data is None:
        x_eval = real_photo_crops(cfg.n_eval, cfg.image_size, seed=1)
        x_calib = real_photo_crops(cfg.n_calib, cfg.image_size, seed=2)
        return x_eval, x_calib, None, "built-in real photographs (matplotlib + scikit-image), random crops"
    x, labels = image_folder_batch(cfg.data, cfg.n_eval + cfg.n_calib, cfg.image_size)
    if len(x) < 2:
        raise MPPluginError(f"{cfg.data}: need at least 2 images")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    n_calib = max(1, min(cfg.n_calib, len(x) // 4))
    calib, ev = order[:n_calib], order[n_calib:]
    return x[ev], x[calib], (labels[ev] if labels is not None else None), f"ImageFolder {cfg.data}"


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_main_job(cfg: MainJobConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run the whole pipeline; returns the results dict that is also written to ``results.json``."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/6] loading {cfg.model}: {weights_description(cfg.model, cfg.checkpoint, cfg.random_init)}")
    dense = load_named_model(cfg.model, cfg.checkpoint, cfg.num_classes, cfg.random_init).eval()
    x_eval, x_calib, labels, data_desc = _inputs(cfg)
    log(f"      data: {data_desc}: {len(x_eval)} eval + {len(x_calib)} calibration images")
    dense_out = batched_outputs(dense, x_eval, desc="dense forward", show=True)

    log(f"[2/6] fitting the Marchenko–Pastur law to every layer and planning budgets ({DEFAULT_BUDGET})")
    analysis = plan(dense, cfg.sparsity, "unstructured", DEFAULT_BUDGET, cfg.plan_config, cfg.model, show_progress=True)
    analysis.save(out / "plan.json")
    log(analysis.to_table(max_rows=12))
    if cfg.plots:
        for fig in plot_plan(analysis, out):
            log(f"      wrote {fig}")

    log("[3/6] pruning: MP methods and the baselines users would otherwise pick")
    rows: list[dict[str, Any]] = []
    models: dict[str, tuple[nn.Module, PrunePlan]] = {}
    for v in cfg.variants:
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        p = plan(model, cfg.sparsity, v.pattern, v.method, cfg.plan_config, cfg.model, reuse_fits=analysis)
        if v.baseline is not None:
            from mp_plugin.evaluation.baselines import prune_baseline

            prune_baseline(v.baseline, model, cfg.sparsity, v.pattern, [x_calib], cfg.plan_config)
        else:
            needs_calib = v.projection != "magnitude" or v.restore or v.permute != "none"
            apply(
                model,
                p,
                calibration=[x_calib[i : i + 8] for i in range(0, len(x_calib), 8)] if needs_calib else None,
                projection=v.projection,
                permute=v.permute,
                restore=RestoreConfig(sequential=True) if v.restore else None,
                show_progress=True,
            )
        report = sparsity_report(model, p)
        pruned_out = batched_outputs(model, x_eval, desc=v.label, show=False)
        fid = output_fidelity(dense_out, pruned_out)
        row = {
            "variant": v.label,
            **asdict(v),
            "sparsity": report.total_sparsity,
            "kn_valid": report.kn_valid,
            **fid.to_dict(),
            "seconds": time.perf_counter() - t0,
        }
        if labels is not None:
            row["top1"] = float((pruned_out.argmax(-1) == labels).float().mean())
        rows.append(row)
        models[v.label] = (model, p)
        log(
            f"      {v.label:<26} sparsity {report.total_sparsity:.3f}  top-1 agreement {fid.top1_agreement:.3f}  "
            f"KL {fid.kl:.4f}  cosine {fid.cosine:.4f}"
        )
        p.save(out / f"plan-{_slug(v.label)}.json")

    results: dict[str, Any] = {
        "model": cfg.model,
        "data": data_desc,
        "n_eval": len(x_eval),
        "sparsity": cfg.sparsity,
        "rows": rows,
    }
    if labels is not None:
        results["dense_top1"] = float((dense_out.argmax(-1) == labels).float().mean())

    kn_rows = [r for r in rows if r["family"] == "mp" and r["pattern"] != "unstructured"]
    best = max(kn_rows, key=lambda r: (r["top1_agreement"], -r["kl"])) if kn_rows else None
    if cfg.certify and best is not None:
        log(f"[4/6] certificate for '{best['variant']}' (the rigorous bound where it can run)")
        from mp_plugin.certificate import certify_auto

        best_model, best_plan = models[best["variant"]]
        cert = certify_auto(  # the plan's permutation record (if any) aligns the dense model
            dense, best_model, x_eval, labels, log=lambda m: log(f"      {m}"), show_progress=True, plan=best_plan
        )
        (out / "certificate.json").write_text(json.dumps(cert.to_dict(per_sample=True), indent=1, default=str))
        results["certificate"] = {
            "variant": best["variant"],
            "mode": cert.mode,
            "claim": cert.claim,
            "preserved_fraction": cert.preserved_fraction,
        }
        log(f"      {describe_preserved(cert.preserved_fraction, cert.claim)}")
    else:
        log("[4/6] certificate skipped")

    if cfg.export and best is not None:
        log(f"[5/6] ONNX export of '{best['variant']}' with 2:4 verification and onnxruntime parity")
        try:
            from mp_plugin.integrations.onnx import export_onnx
        except ImportError as exc:
            log(f"      skipped: {exc}")
        else:
            model, p = models[best["variant"]]
            rep = export_onnx(
                model, out / "model-2of4.onnx", (1, 3, cfg.image_size, cfg.image_size), plan=p, show_progress=True
            )
            results["onnx"] = {
                "path": str(rep.path),
                "pattern_ok": rep.pattern_ok,
                "initializers_checked": len(rep.checks),
                "parity_ok": rep.parity_ok,
                "max_abs_diff": rep.max_abs_diff,
            }
            log(
                f"      wrote {rep.path}: {len(rep.checks)} initializers checked, k:n intact={rep.pattern_ok}, "
                f"onnxruntime max|Δ|={rep.max_abs_diff:.2e}"
            )
    else:
        log("[5/6] ONNX export skipped")

    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("[6/6] summary")
    log(format_summary(results))
    log(f"      wrote {out / 'results.json'}")
    return results


def describe_preserved(fraction: float, claim: str) -> str:
    """One line saying which share of images is marked preserved, worded to the certificate's claim."""
    if claim == "proven":
        return f"{fraction:.1%} of eval images provably keep their dense prediction (proven: rigorous bound)"
    if claim == "estimated":
        return f"{fraction:.1%} of eval images keep their dense prediction by a first-order estimate (estimated)"
    return (
        f"{fraction:.1%} of eval images have a dense margin above twice their logit shift "
        "(measured on these same images, not proven)"
    )


def variant_slug(variant: Variant) -> str:
    """The short name of a variant on the command line (``mp-plugin demo --variants``), e.g. ``mp-2-4-seb-cast``."""
    return _slug(variant.label)


def select_variants(slugs: list[str] | None) -> tuple[Variant, ...]:
    """The :data:`DEFAULT_VARIANTS` named by ``slugs`` (all when None).

    Raises:
        ConfigError: an unknown slug (the message lists the known ones).
    """
    if not slugs:
        return DEFAULT_VARIANTS
    known = {variant_slug(v): v for v in DEFAULT_VARIANTS}
    unknown = [s for s in slugs if s not in known]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; known: {sorted(known)}")
    return tuple(known[s] for s in slugs)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def format_summary(results: dict[str, Any]) -> str:
    """The before/after table: one row per pruned variant, fidelity to the dense model."""
    has_top1 = any("top1" in r for r in results["rows"])
    head = f"{'variant':<26} {'sparsity':>8} {'k:n ok':>6} {'top-1 agree':>11} {'KL':>8} {'cosine':>7}"
    head += f" {'top-1':>6}" if has_top1 else ""
    lines = [head, "-" * len(head)]
    if has_top1:
        lines.append(f"{'dense':<26} {0.0:8.3f} {'':>6} {1.0:11.3f} {0.0:8.4f} {1.0:7.4f} {results['dense_top1']:6.3f}")
    for r in results["rows"]:
        line = (
            f"{r['variant']:<26} {r['sparsity']:8.3f} {('yes' if r['kn_valid'] else 'NO'):>6} "
            f"{r['top1_agreement']:11.3f} {r['kl']:8.4f} {r['cosine']:7.4f}"
        )
        lines.append(line + (f" {r['top1']:6.3f}" if has_top1 else ""))
    lines.append(f"{results['model']} on {results['data']} ({results['n_eval']} images), {results['seconds']:.0f} s")
    return "\n".join(lines)
