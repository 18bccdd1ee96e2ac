"""Recipe benchmark: uniform magnitude vs SEB vs SER/Hybrid, at 50 % unstructured and 2:4, before and after
a short fixed distillation budget, on the real pretrained EfficientNet-Lite0 with offline real data.

* Model: ImageNet-pretrained EfficientNet-Lite0 (``load_model("efficientnet_lite0")``), frozen dense teacher.
* Distillation data: Debian's ``dataset-fashion-mnist`` (real images; their labels are not ImageNet
  classes, so training is pure distillation, α = 1: teacher logits are the targets, labels unused).
  Images are replicated to 3 channels, upsampled bilinearly and ImageNet-normalised.
* Metrics, against the dense model: top-1 agreement and mean KL(dense ‖ pruned) on real photo crops
  (``mp_plugin.evaluation.photos.builtin_photo_crops``, 224 px) and on held-out Fashion-MNIST images.
* Fixed budget: every method gets the same distillation run (same images, order, steps, optimiser).
  SER additionally spends ``ser_selection_steps`` selection-phase steps; this is reported.

Methods at 50 % unstructured: ``uniform`` (same fraction per layer, magnitude), ``seb`` (Spectral Edge
Budgeting, global |W|/w_ℓ), ``hybrid`` (global magnitude to 0.20, then one SER step to 0.50).
At 2:4: ``uniform`` (magnitude 2:4), ``seb+cast`` (CAST projection with a Hamming prior α towards the
SEB unstructured mask), ``ser+cast`` (SER to 0.50 unstructured, then ``ser_to_kn``: CAST with free
restoration from the dense weights and the prior towards the SER mask). Sparsity is reported over the
pruning target layers (default selection: no stem, head or depthwise convs).

Run: ``python benchmarks/recipe.py`` (pins 2 torch threads); writes ``benchmarks/results/recipe.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, write_result  # noqa: E402

from mp_plugin.evaluation.fashion_mnist import load_fashion_mnist  # noqa: E402
from mp_plugin.evaluation.models import load_model  # noqa: E402
from mp_plugin.evaluation.photos import builtin_photo_crops, normalise_imagenet  # noqa: E402
from mp_plugin.layers.discovery import find_target_layers  # noqa: E402
from mp_plugin.masks.keep import MaskKeeper  # noqa: E402
from mp_plugin.planning.build import plan  # noqa: E402
from mp_plugin.pruning.apply_plan import apply, sparsity_report  # noqa: E402
from mp_plugin.recover.distill import DistillConfig, distill  # noqa: E402
from mp_plugin.recover.ser import HybridConfig, SERConfig, hybrid_magnitude_ser, ser_to_kn  # noqa: E402


@dataclass
class RecipeBench:
    """Sizes of the benchmark (defaults fit < 10 min on 2 loaded cores)."""

    threads: int = 2
    n_train: int = 128
    n_fashion_eval: int = 64
    n_photos: int = 32
    train_res: int = 128
    eval_res: int = 224
    batch_size: int = 16
    epochs: int = 1
    lr: float = 1e-4
    ser_selection_steps: int = 8
    ser_lr: float = 4e-4
    cast_prior_alpha: float = 0.1
    n_calibration: int = 16
    seed: int = 0


def fashion_images(split: str, n: int, res: int, seed: int) -> torch.Tensor:
    """``n`` seeded Fashion-MNIST images as (n, 3, res, res) ImageNet-normalised float32."""
    images = load_fashion_mnist(split).images  # (N, 1, 28, 28) in [0, 1]
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    x = images[torch.from_numpy(np.sort(idx))].repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    return normalise_imagenet(x)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Eval-mode logits of ``x`` in batches: (N, 1000)."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, dense top-1 within the pruned top-5, and mean KL(softmax(ref) ‖ softmax(out)) in nats."""
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="batchmean", log_target=True)
    top1 = ref.argmax(-1)
    in_top5 = (out.topk(5, -1).indices == top1[:, None]).any(-1)
    return {
        "agreement": float((top1 == out.argmax(-1)).float().mean()),
        "top5_agreement": float(in_top5.float().mean()),
        "kl": float(kl),
    }


def target_sparsity(model: torch.nn.Module) -> tuple[float, bool]:
    """Fraction of zeros over the pruning target layers (default LayerSelection) and whether k:n holds."""
    targets, _ = find_target_layers(model)
    zeros = sum(int((t.weight == 0).sum()) for t in targets)
    return zeros / sum(t.weight.numel() for t in targets), sparsity_report(model).kn_valid


def evaluate(model, evalsets, refs) -> dict[str, dict[str, float]]:
    return {name: compare(refs[name], logits(model, x)) for name, x in evalsets.items()}


def prune_method(name: str, pattern: str, dense, calib, loader, cfg: RecipeBench):
    """A pruned copy of ``dense`` and the extra training steps the method used."""
    model = copy.deepcopy(dense)
    extra_steps = 0
    ser_cfg = SERConfig(
        extra=0.03,
        selection=DistillConfig(
            epochs=100, max_steps=cfg.ser_selection_steps, lr=cfg.ser_lr, min_lr_ratio=0.25, weight_decay=0.0, alpha=1.0
        ),
        finetune=None,
    )
    if name in ("hybrid", "ser+cast"):
        schedule = (0.2, 0.5) if name == "hybrid" else (0.5,)
        result = hybrid_magnitude_ser(
            model, loader, teacher=dense, config=HybridConfig(schedule=schedule, finetune=None, ser=ser_cfg)
        )
        extra_steps = cfg.ser_selection_steps
        if pattern != "unstructured":
            ser_to_kn(model, dense, result.masks, pattern, calibration=calib, prior_alpha=cfg.cast_prior_alpha)
            return model, extra_steps
    if pattern == "unstructured":
        if name != "hybrid":
            method = {"uniform": "uniform", "seb": "seb"}[name]
            apply(model, plan(model, 0.5, "unstructured", method))
        return model, extra_steps
    if name == "uniform":
        apply(model, plan(model, 0.5, pattern, "magnitude"), method="magnitude")
    else:
        apply(
            model,
            plan(model, 0.5, pattern, "seb"),
            calibration=calib,
            method="cast",
            prior_alpha=cfg.cast_prior_alpha,
        )
    return model, extra_steps


def markdown_table(payload: dict) -> str:
    """The results as a Markdown table (before → after the fixed distillation budget)."""
    head = (
        "| pattern | method | sparsity | photos top-1 agr. | photos top-5 agr. | photos KL | "
        "F-MNIST top-1 agr. | F-MNIST KL | extra SER steps |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in payload["rows"]:
        b, a = r["before_ft"], r["after_ft"]
        lines.append(
            f"| {r['pattern']} | {r['method']} | {r['sparsity_target_layers']:.3f} | "
            f"{b['photos']['agreement']:.3f} → {a['photos']['agreement']:.3f} | "
            f"{b['photos']['top5_agreement']:.3f} → {a['photos']['top5_agreement']:.3f} | "
            f"{b['photos']['kl']:.2f} → {a['photos']['kl']:.2f} | "
            f"{b['fashion_test']['agreement']:.3f} → {a['fashion_test']['agreement']:.3f} | "
            f"{b['fashion_test']['kl']:.2f} → {a['fashion_test']['kl']:.2f} | {r['extra_selection_steps']} |"
        )
    m = payload["machine"]
    lines.append(
        f"\nEfficientNet-Lite0, {payload['settings']['n_train']} Fashion-MNIST images, "
        f"{payload['rows'][0]['distill_steps']} distillation steps per method; {m['cpu']}, "
        f"{payload['settings']['threads']} threads, load average {m['loadavg_1_5_15']}, {m['date']}, "
        f"{payload['seconds_total']:.0f} s in total."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in asdict(RecipeBench()).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--table-only", action="store_true", help="rewrite recipe.md from recipe.json and exit")
    args = vars(parser.parse_args())
    if args.pop("table_only"):
        payload = json.loads((RESULTS / "recipe.json").read_text())
        (RESULTS / "recipe.md").write_text(markdown_table(payload))
        print(markdown_table(payload))
        return
    cfg = RecipeBench(**args)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    dense = load_model("efficientnet_lite0").eval()
    train_x = fashion_images("train", cfg.n_train, cfg.train_res, cfg.seed)
    calib = train_x[: cfg.n_calibration]
    evalsets = {
        "photos": builtin_photo_crops(cfg.n_photos, size=cfg.eval_res, seed=cfg.seed + 1),
        "fashion_test": fashion_images("test", cfg.n_fashion_eval, cfg.train_res, cfg.seed + 2),
    }
    refs = {name: logits(dense, x) for name, x in evalsets.items()}
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(train_x), batch_size=cfg.batch_size, shuffle=True, generator=g)
    loader_unwrapped = [b[0] for b in loader]  # one fixed order of bare image batches, reused by every method
    distill_cfg = DistillConfig(
        alpha=1.0,
        tau=2.0,
        epochs=cfg.epochs,
        optimizer="adamw",
        lr=cfg.lr,
        weight_decay=0.0,
        warmup_steps=1,
        batch_size=cfg.batch_size,
        freeze_norm_stats=True,
        log_every=1,
        seed=cfg.seed,
    )
    rows = []
    for pattern in ("unstructured", "2:4"):
        methods = ("uniform", "seb", "hybrid") if pattern == "unstructured" else ("uniform", "seb+cast", "ser+cast")
        for name in methods:
            t0 = time.perf_counter()
            model, extra = prune_method(name, pattern, dense, calib, loader_unwrapped, cfg)
            t_prune = time.perf_counter() - t0
            sparsity, kn_valid = target_sparsity(model)
            before = evaluate(model, evalsets, refs)
            masks = MaskKeeper(model).state_dict()["masks"]
            result = distill(
                model,
                dense,
                loader_unwrapped,
                distill_cfg,
                keeper=MaskKeeper(model, masks),
                show_progress=False,
            )
            after = evaluate(model, evalsets, refs)
            row = {
                "pattern": "50% unstructured" if pattern == "unstructured" else "2:4",
                "method": name,
                "sparsity_target_layers": sparsity,
                "kn_valid": kn_valid,
                "before_ft": before,
                "after_ft": after,
                "distill_steps": result.steps,
                "extra_selection_steps": extra,
                "distill_loss_first_last": [result.first_loss, result.last_loss],
                "seconds_prune": round(t_prune, 1),
                "seconds_distill": round(result.seconds, 1),
            }
            rows.append(row)
            print(
                f"{row['pattern']:>17} {name:<9} s={sparsity:.3f} "
                f"photos agree {before['photos']['agreement']:.3f}→{after['photos']['agreement']:.3f} "
                f"top5 {before['photos']['top5_agreement']:.3f}→{after['photos']['top5_agreement']:.3f} "
                f"KL {before['photos']['kl']:.3f}→{after['photos']['kl']:.3f} | fashion agree "
                f"{before['fashion_test']['agreement']:.3f}→{after['fashion_test']['agreement']:.3f} "
                f"KL {before['fashion_test']['kl']:.3f}→{after['fashion_test']['kl']:.3f} "
                f"({t_prune:.0f}+{result.seconds:.0f} s)",
                flush=True,
            )
    payload = {
        "benchmark": "recipe",
        "model": "efficientnet_lite0 (ImageNet-pretrained, built-in)",
        "settings": asdict(cfg),
        "distill_config": distill_cfg.to_dict(),
        "data": {
            "train": f"Fashion-MNIST train, {cfg.n_train} seeded images at {cfg.train_res} px, labels unused",
            "eval": {
                "photos": f"{cfg.n_photos} crops of matplotlib's grace_hopper.jpg at {cfg.eval_res} px",
                "fashion_test": f"{cfg.n_fashion_eval} seeded Fashion-MNIST test images at {cfg.train_res} px",
            },
        },
        "metrics": "top-1 agreement with the dense model and mean KL(dense ‖ pruned) in nats",
        "rows": rows,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    path = write_result("recipe", payload, packages=("timm", "torchvision", "efficientnet-lite-pytorch"))
    payload = json.loads(path.read_text())
    (RESULTS / "recipe.md").write_text(markdown_table(payload))
    print(markdown_table(payload))
    print(f"wrote {path} and recipe.md in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
