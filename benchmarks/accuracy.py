"""Accuracy benchmark: MP budgets against the pruners users would otherwise pick, no fine-tuning.

For each model, every method prunes a fresh copy of the dense model to the same
layers and the same total, and two numbers are reported: a task metric and the
output fidelity to the dense model.

* ``minilm``: real all-MiniLM-L6-v2. Task = supersense linear probe (lexicographer
  file of Debian ``wordnet-base`` noun/verb glosses; probe re-fitted on the pruned
  features); fidelity = mean embedding cosine. Calibration = other glosses.
* ``efficientnet_lite0``: real ImageNet EfficientNet-Lite0. Fidelity (top-1
  agreement, KL, logit cosine) on held-out real photo crops; calibration = other crops.
* ``fmnist_mlp`` / ``fmnist_cnn``: networks trained here on Fashion-MNIST (mp_plugin.evaluation.zoo).
  Task = test accuracy; fidelity as above.

Settings: 50/60/70 % unstructured, 2:4 and 4:8. SEB variants investigate why SEB
loses to global magnitude (direction, Hill α, shape-free signals from
``mp_plugin.budget.signals``). Usage::

    python benchmarks/accuracy.py --models minilm efficientnet_lite0 fmnist_mlp --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS as RESULTS_DIR  # noqa: E402
from common import write_result  # noqa: E402

from mp_plugin.budget import signals as budget_signals  # noqa: E402, F401  (registers seb-sigma, seb-bulk-energy, seb-bulk-fraction)
from mp_plugin.budget.rules import SEBConfig  # noqa: E402
from mp_plugin.evaluation.baselines import BaselineNotApplicable, prune_baseline  # noqa: E402
from mp_plugin.evaluation.metrics import batched_outputs, linear_probe_accuracy, output_fidelity  # noqa: E402
from mp_plugin.planning.build import PlanConfig, plan  # noqa: E402
from mp_plugin.pruning.apply_plan import apply, sparsity_report  # noqa: E402
from mp_plugin.restore import RestoreConfig  # noqa: E402

UNSTRUCTURED = (0.5, 0.6, 0.7)
KN = ("2:4", "4:8")

# (label, budget method, SEB direction)
SEB_VARIANTS: tuple[tuple[str, str, float], ...] = (
    ("seb (σ₊, paper)", "seb", 1.0),
    ("seb σ₊ direction −1", "seb", -1.0),
    ("seb-hill", "seb-hill", 1.0),
    ("seb-hill direction −1", "seb-hill", -1.0),
    ("seb-sigma (σ̂, shape-free)", "seb-sigma", 1.0),
    ("seb-sigma direction −1", "seb-sigma", -1.0),
    ("seb-bulk-energy", "seb-bulk-energy", 1.0),
    ("seb-bulk-energy direction −1", "seb-bulk-energy", -1.0),
    ("seb-bulk-fraction", "seb-bulk-fraction", 1.0),
    ("seb-bulk-fraction direction −1", "seb-bulk-fraction", -1.0),
)


@dataclass
class Task:
    """A model with its calibration data and its two-number evaluation."""

    name: str
    model: torch.nn.Module
    calibration: Any
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    task_metric: str
    fidelity_metric: str
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the texts evaluation/calibration use


# --------------------------------------------------------------------------- data


def wordnet_glosses(root: Path = Path("/usr/share/wordnet")) -> list[tuple[str, int]]:
    """(gloss, lexicographer file number) for every noun and verb synset of Debian ``wordnet-base``."""
    out = []
    for pos in ("noun", "verb"):
        path = root / f"data.{pos}"
        if not path.exists():
            raise SystemExit(f"{path} missing: apt-get install -y wordnet-base")
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            fields = line.split(" ", 3)
            gloss = line.split("|", 1)[1].strip().split(";")[0].strip()
            if len(gloss) > 10:
                out.append((gloss, int(fields[1])))
    return out


def minilm_task(classes: int = 20, per_class: int = 20, n_calib: int = 40, seed: int = 0) -> Task:
    """MiniLM with a balanced supersense probe set and separate calibration glosses."""
    from mp_plugin.evaluation.models import load_model

    model = load_model("minilm")
    glosses = wordnet_glosses()
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[str]] = {}
    for text, lex in glosses:
        by_class.setdefault(lex, []).append(text)
    chosen = sorted(by_class, key=lambda c: -len(by_class[c]))[:classes]
    texts, labels, calib = [], [], []
    for ci, c in enumerate(sorted(chosen)):
        pool = by_class[c]
        order = torch.randperm(len(pool), generator=g).tolist()
        texts += [pool[i] for i in order[:per_class]]
        labels += [ci] * per_class
        calib += [pool[i] for i in order[per_class : per_class + max(1, n_calib // classes)]]
    y = torch.tensor(labels)
    split = torch.randperm(len(texts), generator=g)
    tr, te = split[: len(texts) * 3 // 5], split[len(texts) * 3 // 5 :]
    tok = model.tokenizer(calib[:n_calib], padding=True, truncation=True, max_length=24, return_tensors="pt")
    calibration = [{"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}]
    dense_emb = model.encode(texts, max_length=24)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        emb = dense_emb if m is model else m.encode(texts, max_length=24)
        probe = linear_probe_accuracy(emb[tr], y[tr], emb[te], y[te], seed=seed)
        cos = float(torch.nn.functional.cosine_similarity(emb, dense_emb, dim=-1).mean())
        return {"probe_accuracy": probe, "embedding_cosine": cos}

    used = {"probe_texts": texts, "calibration_texts": calib[:n_calib]}
    return Task("minilm", model, calibration, evaluate, "probe_accuracy", "embedding_cosine", used)


def _classifier_task(name: str, model: torch.nn.Module, x_eval: torch.Tensor, y: torch.Tensor | None, calib: Any):
    dense_out = batched_outputs(model, x_eval)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        out = dense_out if m is model else batched_outputs(m, x_eval)
        fid = output_fidelity(dense_out, out)
        res = {"top1_agreement": fid.top1_agreement, "kl": fid.kl, "logit_cosine": fid.cosine}
        if y is not None:
            res["test_accuracy"] = float((out.argmax(-1) == y).float().mean())
        return res

    task_metric = "test_accuracy" if y is not None else "top1_agreement"
    return Task(name, model, calib, evaluate, task_metric, "logit_cosine" if y is not None else "kl")


def efficientnet_task(n_eval: int = 48, n_calib: int = 32, eval_seed: int = 1) -> Task:
    """EfficientNet-Lite0 on real photo crops (fidelity only: no labels ship offline); ``eval_seed`` picks the crops."""
    from mp_plugin.evaluation.models import load_model
    from mp_plugin.evaluation.photos import real_photo_crops

    model = load_model("efficientnet_lite0")
    x_eval = real_photo_crops(n_eval, 224, seed=eval_seed)
    calib = real_photo_crops(n_calib, 224, seed=2)
    return _classifier_task("efficientnet_lite0", model, x_eval, None, [calib[:16], calib[16:]])


def fmnist_task(name: str, n_eval: int = 2000, n_calib: int = 256, model: torch.nn.Module | None = None) -> Task:
    """A zoo network trained here on Fashion-MNIST (or ``model``, e.g. one trained at another seed)."""
    from mp_plugin.evaluation.fashion_mnist import load_fashion_mnist
    from mp_plugin.evaluation.zoo import trained_model

    model = trained_model(name) if model is None else model
    test = load_fashion_mnist("test")
    train = load_fashion_mnist("train")
    x = test.images[:n_eval]
    return _classifier_task(name, model, x, test.labels[:n_eval], [train.images[-n_calib:]])


# --------------------------------------------------------------------------- methods


def run_ours(task: Task, setting: str, budget: str, direction: float, kn_method: str, permute: str) -> torch.nn.Module:
    """SEB-family plan + apply on a fresh copy of the dense model."""
    m = copy.deepcopy(task.model)
    pattern = "unstructured" if setting.endswith("%") else setting
    s = float(setting[:-1]) / 100 if setting.endswith("%") else 0.5
    cfg = PlanConfig(seb=SEBConfig(direction=direction))
    p = plan(m, s, pattern, budget, cfg)
    calib = task.calibration if kn_method == "cast" or permute != "none" else None  # permutation verifies on it
    return apply(m, p, calibration=calib, method=kn_method, permute=permute)


def run_restore(
    task: Task, setting: str, budget: str, projection: str, permute: str, restore: RestoreConfig | None
) -> torch.nn.Module:
    """Plan with ``budget``, then apply with a Gram-aware projection and prune–restore (fresh copy)."""
    m = copy.deepcopy(task.model)
    pattern = "unstructured" if setting.endswith("%") else setting
    s = float(setting[:-1]) / 100 if setting.endswith("%") else 0.5
    p = plan(m, s, pattern, budget, PlanConfig())
    return apply(m, p, calibration=task.calibration, projection=projection, permute=permute, restore=restore)


def restore_methods_for(setting: str) -> list[tuple[str, Callable[[Task], torch.nn.Module]]]:
    """The prune–restore suite (issue 12): baselines and MP with/without restore, one-shot and sequential."""
    one, seq = RestoreConfig(), RestoreConfig(sequential=True)
    out: list[tuple[str, Callable]] = []
    kn = not setting.endswith("%")
    base = (
        ("uniform-magnitude", "wanda", "sparsegpt", "sparsegpt-obs")
        if kn
        else ("uniform-magnitude", "global-magnitude", "wanda", "sparsegpt-obs")
    )
    labels = {
        "uniform-magnitude": "magnitude k:n" if kn else "uniform-magnitude",
        "sparsegpt": "ModelOpt sparsegpt (mask only)",
    }
    for b in base:
        out.append((labels.get(b, b), lambda t, b=b: run_baseline(t, setting, b)))
    if kn:
        perm = "swap"
        out.append(("MP seb+cast+perm", lambda t: run_ours(t, setting, "seb", 1.0, "cast", perm)))
        for label, proj, cfg in (
            ("MP seb+cast+perm+restore", "cast", one),
            ("MP seb+cast+perm+restore(seq)", "cast", seq),
            ("MP cast-obs+perm+restore(seq)", "cast-obs", seq),
            ("MP obs+perm+restore(seq)", "obs", seq),
        ):
            pm = "none" if "+perm" not in label else perm
            out.append((label, lambda t, proj=proj, cfg=cfg, pm=pm: run_restore(t, setting, "seb", proj, pm, cfg)))
    else:
        out.append(("MP seb", lambda t: run_ours(t, setting, "seb", 1.0, "magnitude", "none")))
        for label, budget, proj, cfg in (
            ("MP seb+restore", "seb", "magnitude", one),
            ("MP seb+restore(seq)", "seb", "magnitude", seq),
            ("MP bounded-bulk-energy+obs+restore(seq)", "bounded-bulk-energy", "obs", seq),
            ("MP mag-bulk-energy+obs+restore(seq)", "mag-bulk-energy", "obs", seq),
            ("uniform budget+obs+restore(seq)", "uniform", "obs", seq),
            ("global budget+cast-obs+restore(seq)", "magnitude", "cast-obs", seq),
        ):
            out.append((label, lambda t, b=budget, p=proj, c=cfg: run_restore(t, setting, b, p, "none", c)))
    return out


def run_baseline(task: Task, setting: str, name: str) -> torch.nn.Module:
    """A registered baseline on a fresh copy of the dense model."""
    m = copy.deepcopy(task.model)
    pattern = "unstructured" if setting.endswith("%") else setting
    s = float(setting[:-1]) / 100 if setting.endswith("%") else 0.5
    return prune_baseline(name, m, s, pattern, task.calibration)


def methods_for(setting: str) -> list[tuple[str, Callable[[Task], torch.nn.Module]]]:
    """(label, runner) pairs for one setting."""
    out: list[tuple[str, Callable]] = []
    if setting.endswith("%"):
        for b in ("uniform-magnitude", "global-magnitude", "wanda", "torchao-wanda"):
            out.append((b, lambda t, b=b: run_baseline(t, setting, b)))
        for label, budget, d in SEB_VARIANTS:
            out.append((label, lambda t, budget=budget, d=d: run_ours(t, setting, budget, d, "magnitude", "none")))
    else:
        for b in ("uniform-magnitude", "wanda", "sparsegpt", "torchao-wanda"):
            out.append((b if b != "uniform-magnitude" else "magnitude k:n", lambda t, b=b: run_baseline(t, setting, b)))
        out.append(("seb+cast", lambda t: run_ours(t, setting, "seb", 1.0, "cast", "none")))
        out.append(("seb+cast+perm(swap)", lambda t: run_ours(t, setting, "seb", 1.0, "cast", "swap")))
        out.append(("magnitude k:n+perm(swap)", lambda t: run_ours(t, setting, "seb", 1.0, "magnitude", "swap")))
    return out


def bench(
    task: Task, settings: list[str], suite: str = "full", checkpoint: Callable[[dict], None] | None = None
) -> dict:
    """Run every method of ``suite`` in every setting; returns a JSON-ready dict.

    ``checkpoint(partial_result)`` is called after each setting, so a long run keeps what it measured."""
    chooser = restore_methods_for if suite == "restore" else methods_for
    t0 = time.perf_counter()
    dense = task.evaluate(task.model)
    print(f"[{task.name}] dense {dense}  load={os.getloadavg()}", flush=True)
    rows = []
    for setting in settings:
        for label, runner in chooser(setting):
            t1 = time.perf_counter()
            try:
                pruned = runner(task)
            except BaselineNotApplicable as exc:
                rows.append({"setting": setting, "method": label, "skipped": str(exc)})
                continue
            metrics = task.evaluate(pruned)
            sp = sparsity_report(pruned).total_sparsity
            rows.append(
                {
                    "setting": setting,
                    "method": label,
                    **metrics,
                    "linear_conv_sparsity": sp,
                    "seconds": time.perf_counter() - t1,
                }
            )
            print(
                f"[{task.name}] {setting:>5} {label:<28} {task.task_metric}={metrics[task.task_metric]:.4f} "
                f"{task.fidelity_metric}={metrics[task.fidelity_metric]:.4f} sparsity={sp:.3f} "
                f"({time.perf_counter() - t1:.1f}s) load={os.getloadavg()[0]:.1f}",
                flush=True,
            )
        if checkpoint is not None:
            checkpoint(_result(task, dense, rows, t0, complete=False))
    return _result(task, dense, rows, t0, complete=True)


def _result(task: Task, dense: dict, rows: list[dict], t0: float, complete: bool) -> dict:
    return {
        "model": task.name,
        "task_metric": task.task_metric,
        "fidelity_metric": task.fidelity_metric,
        "dense": dense,
        "rows": rows,
        "complete": complete,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
        "loadavg_end": list(os.getloadavg()),
    }


def to_markdown(result: dict) -> str:
    """One table per model: method × setting, cells ``task / fidelity``."""
    settings = list(dict.fromkeys(r["setting"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    cell = {(r["setting"], r["method"]): r for r in result["rows"]}
    tm, fm = result["task_metric"], result["fidelity_metric"]
    lines = [
        f"### {result['model']}: {tm} / {fm} (dense {result['dense'][tm]:.4f} / {result['dense'][fm]:.4f})",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for m in methods:
        vals = []
        for s in settings:
            r = cell.get((s, m))
            vals.append("" if r is None else "n/a" if "skipped" in r else f"{r[tm]:.3f} / {r[fm]:.3f}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


TASKS: dict[str, Callable[[], Task]] = {
    "minilm": minilm_task,
    "efficientnet_lite0": efficientnet_task,
    "fmnist_mlp": lambda: fmnist_task("fmnist_mlp"),
    "fmnist_cnn": lambda: fmnist_task("fmnist_cnn"),
}


def main(argv: list[str] | None = None) -> None:
    """CLI entry: run the chosen models and write benchmarks/results/accuracy-<model>.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--settings", nargs="+", default=[f"{int(100 * s)}%" for s in UNSTRUCTURED] + list(KN))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minilm-calib", type=int, default=40, help="MiniLM calibration glosses (restore needs ≥ d rows)")
    ap.add_argument("--append", action="store_true", help="merge into an existing results file (other settings kept)")
    ap.add_argument("--suite", choices=("full", "restore"), default="full", help="restore: the prune–restore rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in args.models:
        task = minilm_task(n_calib=args.minilm_calib) if name == "minilm" else TASKS[name]()
        stem = f"accuracy-{name}" if args.suite == "full" else f"accuracy-restore-{name}"

        def save(result: dict, name: str = name, stem: str = stem) -> Path:
            old = RESULTS_DIR / f"{stem}.json"
            if args.append and old.is_file():  # keep the other settings' rows of an earlier run
                kept = [r for r in json.loads(old.read_text())["rows"] if r["setting"] not in args.settings]
                result = {**result, "rows": kept + result["rows"]}
            result["suite"] = args.suite
            result["minilm_calibration_texts"] = args.minilm_calib if name == "minilm" else None
            path = write_result(stem, result, packages=("nvidia-modelopt", "torchao", "transformers"))
            path.with_suffix(".md").write_text(to_markdown(result))
            return path

        path = save(bench(task, args.settings, args.suite, checkpoint=save))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
