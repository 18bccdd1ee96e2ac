"""Scale: time and peak RSS of plan, apply and restore on Llama-shaped language models (issue 19).

Run: ``.venv/bin/python benchmarks/scale.py [--threads 2] [--models 0.1b,0.5b,1.1b]``.
Writes ``benchmarks/results/scale.json`` (``--name`` changes the file name).

Models are random-init bf16 ``LlamaForCausalLM``s (transformers; the cost of an MP
fit does not depend on the weights' values):

* ``0.1b``: hidden 768, MLP 2048, 12 layers, 12 heads / 4 key-value heads (0.12 B parameters);
* ``0.5b``: hidden 1536, MLP 4096, 16 layers, 12 / 4 heads (0.50 B);
* ``1.1b``: hidden 2048, MLP 5632, 22 layers, 32 / 4 heads, the issue's TinyLlama shape (1.10 B).

Every stage runs in its own child process that builds the model from the same seed,
returns the allocator's free pages (``malloc_trim``), then resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5) and reads
``VmHWM`` after the stage, so a stage's peak RSS is measured alone (it includes the
model and the interpreter). Stages:

* ``plan``: ``mp.plan(model, 0.5, "2:4")`` with the defaults (float32 Gram, float64
  where σ̂ would move by more than 1e-6), per work unit times of the MP fits;
* ``plan-float64``: the same with ``PlanConfig(gram_dtype="float64")``;
* ``plan-legacy``: the code before the streaming change (git commit ``LEGACY``, float64,
  stacked batches of 16 weights, every score concatenated for the budget), extracted
  with ``git archive`` into a temporary directory;
* ``apply``: ``mp.apply(model, plan)`` (magnitude 2:4) with the saved plan;
* ``restore``: ``mp.apply(model, plan, calibration, restore=RestoreConfig(sequential=True,
  dtype="float32", max_iter=10))`` on 8192 random tokens (8 batches of 2 × 512), one decoder
  layer at a time on cached block inputs (``mp_plugin.restore.chain``); per layer: solve
  time, solver, CG iterations and the calibration output error before/after restore;
* ``restore-converged``: the same with CG run to its default tolerance (1e-3, ≤ 200 steps),
  for what the 10-step cap costs in output error;
* ``restore-float64``: the capped restore with the default ``dtype="float64"``;
* ``restore-noreplay``: the capped restore without block replay (a model forward up to
  every block, the path before ``chain``), for the ratio.

The 7 B / 70 B projection fits per-layer MP time t = a·p²n + b·p³ (p ≤ n the matrix
sides: Gram product and eigen-solve) to the measured work units, and the budget's
radix select to c·numel, then sums over Llama-2-7B and Llama-2-70B shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LEGACY = "35f921a"  # last commit before the streaming analysis (f1538db)

MODELS = {
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, kv=4),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12, kv=4),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, kv=4),
}
PROJECTED = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, kv=32),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, kv=8),
}
VOCAB = 32000
CALIB_BATCHES, CALIB_SEQS_PER_BATCH, CALIB_TOKENS = 8, 2, 512  # 8192 calibration tokens
RESTORE_MAX_ITER = 10  # CG steps after the OBS warm start; "restore-converged" runs to tol 1e-3 (≤ 200)


# ----------------------------------------------------------------------------- child side


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(name: str):  # noqa: ANN201 - a transformers model
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(MODELS[name])
    kv = spec.pop("kv")
    config = LlamaConfig(**spec, num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=2048)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16: no float32 copy of the model
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def child(stage: str, name: str, threads: int, plan_path: str, legacy_dir: str) -> dict:
    if stage == "plan-legacy":
        sys.path.insert(0, legacy_dir)
    import torch

    torch.set_num_threads(threads)
    import mp_plugin as mp

    if stage == "plan-legacy":
        assert Path(mp.__file__).resolve().is_relative_to(Path(legacy_dir).resolve()), mp.__file__
    rss_start = _status_kib("VmRSS")
    t0 = time.perf_counter()
    model = build(name)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _trim()  # give back what the model's random init freed, so the stage starts from model + interpreter
    rss_model = _status_kib("VmRSS")
    peak_reset = _reset_peak()
    out: dict = {"stage": stage, "model": name, "threads": threads, "build_s": build_s, "params": n_params}
    units: list[dict] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if stage in ("plan", "plan-float64"):
        import mp_plugin.planning.build as planning
        import mp_plugin.spectrum.analysis as analysis

        real_fit_many, real_counts = analysis.fit_many, planning.global_prune_counts
        phase = {"fit_s": 0.0, "budget_s": 0.0}

        def timed_fit_many(weights, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            t = time.perf_counter()
            fits = real_fit_many(weights, *args, **kwargs)
            dt = time.perf_counter() - t
            phase["fit_s"] += dt
            shape = tuple(int(s) for s in fits[0].shape)
            units.append({"shape": shape, "layers": len(fits), "seconds": dt, "gram": [f.gram_dtype for f in fits]})
            return fits

        def timed_counts(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            res = real_counts(*args, **kwargs)
            phase["budget_s"] += time.perf_counter() - t
            return res

        analysis.fit_many, planning.global_prune_counts = timed_fit_many, timed_counts
        cfg = mp.PlanConfig(gram_dtype="float64" if stage == "plan-float64" else "float32")
        plan = mp.plan(model, sparsity=0.5, pattern="2:4", config=cfg)
        out.update(phase)
        out["n_layers"] = len(plan.layers)
        out["float64_refits"] = sum(lp.fit.gram_dtype == "float64" for lp in plan.layers if lp.fit is not None)
        if stage == "plan":
            plan.save(plan_path)
    elif stage == "plan-legacy":
        plan = mp.plan(model, sparsity=0.5, pattern="2:4")
        out["n_layers"] = len(plan.layers)
        out["legacy_commit"] = LEGACY
    elif stage == "apply":
        plan = mp.PrunePlan.load(plan_path)
        mp.apply(model, plan)
        out["achieved_sparsity"] = plan.applied["achieved_sparsity"]
    elif stage.startswith("restore"):
        from mp_plugin.restore import RestoreConfig

        plan = mp.PrunePlan.load(plan_path)
        g = torch.Generator().manual_seed(0)
        calib = [
            {
                "input_ids": torch.randint(0, VOCAB, (CALIB_SEQS_PER_BATCH, CALIB_TOKENS), generator=g),
                "attention_mask": torch.ones(CALIB_SEQS_PER_BATCH, CALIB_TOKENS),
            }
            for _ in range(CALIB_BATCHES)
        ]
        import mp_plugin.restore.driver as driver

        real_restore, real_grams, real_replay = driver.restore_layer, driver.capture_grams, driver.replay_run
        phase = {"grams_s": 0.0, "solve_s": 0.0, "replay_s": 0.0, "replayed_blocks": 0}

        def timed_restore(weight, dense, gram, cfg, **kwargs):  # noqa: ANN001, ANN003, ANN202
            t = time.perf_counter()
            rec = real_restore(weight, dense, gram, cfg, **kwargs)
            dt = time.perf_counter() - t
            phase["solve_s"] += dt
            units.append(
                {
                    "shape": [int(x) for x in weight.shape],
                    "layers": 1,
                    "seconds": dt,
                    "solver": rec["solver"],
                    "iterations": rec["iterations"],
                    "rel_error_before": rec["rel_error_before"],
                    "rel_error_after": rec["rel_error_after"],
                }
            )
            return rec

        def timed_grams(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            res = real_grams(*args, **kwargs)
            phase["grams_s"] += time.perf_counter() - t
            return res

        def timed_replay(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            # block forwards on cached inputs and their Gram hooks (the solves run between the yields)
            it = real_replay(*args, **kwargs)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    phase["replay_s"] += time.perf_counter() - t
                    return
                phase["replay_s"] += time.perf_counter() - t
                phase["replayed_blocks"] += 1
                yield item

        driver.restore_layer, driver.capture_grams, driver.replay_run = timed_restore, timed_grams, timed_replay
        if stage == "restore-noreplay":  # the path before block replay: a model forward up to every block
            driver.block_runs = lambda keys, blocks: []
        cfg = RestoreConfig(
            sequential=True,
            dtype="float64" if stage == "restore-float64" else "float32",
            max_iter=200 if stage == "restore-converged" else RESTORE_MAX_ITER,
        )
        mp.apply(model, plan, calib, restore=cfg)
        out.update(phase)
        out["calibration_tokens"] = CALIB_BATCHES * CALIB_SEQS_PER_BATCH * CALIB_TOKENS
        out["calibration_batches"] = CALIB_BATCHES
        out["restore_config"] = cfg.to_dict()
        rec = [v.get("restore", {}) for v in plan.applied["layers"].values()]
        out["restored_layers"] = sum(bool(r) for r in rec)
    else:
        raise SystemExit(f"unknown stage {stage}")
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - cpu0  # all threads: what the stage costs without other jobs
    out["units"] = units
    gib = 1 << 30
    out["model_gib"] = model_bytes / gib
    out["rss_before_build_gib"] = rss_start * 1024 / gib
    out["rss_with_model_gib"] = rss_model * 1024 / gib
    out["peak_rss_gib"] = _status_kib("VmHWM") * 1024 / gib
    out["peak_reset"] = peak_reset
    out["peak_over_model_gib"] = out["peak_rss_gib"] - out["model_gib"]
    return out


# ----------------------------------------------------------------------------- parent side


def run_child(stage: str, name: str, threads: int, plan_path: Path, legacy_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--model", name, "--threads", str(threads)]
    cmd += ["--plan-path", str(plan_path), "--legacy-dir", str(legacy_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if stage == "plan-legacy":
        env["PYTHONPATH"] = str(legacy_dir)
    load = os.getloadavg()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        return {
            "stage": stage,
            "model": name,
            "error": proc.stderr.strip().splitlines()[-1:],
            "returncode": proc.returncode,
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["loadavg_at_start"] = list(load)
    print(
        f"{name:>5} {stage:<13} {res['seconds']:8.1f} s (CPU {res['cpu_seconds']:7.1f} s)  peak RSS {res['peak_rss_gib']:6.2f} GiB "
        f"(model {res['model_gib']:.2f} GiB, +{res['peak_over_model_gib']:.2f})  load {load[0]:.2f}",
        flush=True,
    )
    return res


def _layer_shapes(spec: dict) -> list[tuple[int, int]]:
    """(out, in) of every target Linear of one decoder stack of this shape."""
    h, inter, heads, kv = spec["hidden_size"], spec["intermediate_size"], spec["num_attention_heads"], spec["kv"]
    kv_out = h // heads * kv
    block = [(h, h), (kv_out, h), (kv_out, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return block * spec["num_hidden_layers"]


def _cost_terms(shape: tuple[int, int]) -> tuple[float, float]:
    p, n = sorted(shape)
    return float(p) * p * n, float(p) ** 3


def project(plan_runs: list[dict]) -> dict:
    """Least-squares per-layer time model from measured work units, summed over 7 B / 70 B shapes."""
    rows, times = [], []
    for run in plan_runs:
        for u in run.get("units", []):
            g, e = _cost_terms(tuple(u["shape"]))
            rows.append([g * u["layers"], e * u["layers"]])
            times.append(u["seconds"])
    a, b = np.linalg.lstsq(np.asarray(rows), np.asarray(times), rcond=None)[0]
    per_numel = [r["budget_s"] / r["params_in_targets"] for r in plan_runs if r.get("params_in_targets")]
    c = float(np.mean(per_numel)) if per_numel else 0.0
    fitted = np.asarray(rows) @ np.array([a, b])
    out = {
        "model": "t_layer = a·p²n + b·p³ (Gram + eigen-solve), budget = c·numel",
        "a_s_per_p2n": float(a),
        "b_s_per_p3": float(b),
        "c_s_per_weight": c,
        "fit_rel_residual": float(np.linalg.norm(fitted - np.asarray(times)) / np.linalg.norm(times)),
    }
    for name, spec in PROJECTED.items():
        shapes = _layer_shapes(spec)
        numel = sum(o * i for o, i in shapes)
        fit_s = sum(a * g + b * e for g, e in map(_cost_terms, shapes))
        params = numel + 2 * VOCAB * spec["hidden_size"]
        out[name] = {
            "target_weights": numel,
            "params": params,
            "bf16_gib": params * 2 / (1 << 30),
            "plan_s": float(fit_s + c * numel),
            "fit_s": float(fit_s),
            "budget_s": float(c * numel),
            "largest_gram_mib_float32": max(min(s) for s in shapes) ** 2 * 4 / (1 << 20),
        }
    return out


def table(result: dict) -> str:
    """Markdown tables of a scale result: stages per model, per-layer costs, the 7 B / 70 B projection."""
    lines = [
        "| model | params | bf16 weights | stage | wall time | CPU time | peak RSS | peak − weights | "
        "peak − RSS before stage | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {r['stage']} | failed: {' '.join(r['error'])} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['model_gib']:.2f} GiB | {r['stage']} | "
            f"{r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {r['peak_rss_gib']:.2f} GiB | {r['peak_over_model_gib']:+.2f} GiB | "
            f"{r['peak_rss_gib'] - r['rss_with_model_gib']:+.2f} GiB | {r['loadavg_at_start'][0]:.1f} |"
        )
    lines += ["", "| model | matrix (p × n) | layers | MP fit per layer | per layer / (p²n) |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("stage") != "plan":
            continue
        per: dict[tuple, list[float]] = {}
        for u in r["units"]:
            key = tuple(sorted(u["shape"]))
            per.setdefault(key, [0, 0.0])
            per[key][0] += u["layers"]
            per[key][1] += u["seconds"]
        for (p, n), (count, sec) in sorted(per.items()):
            lines.append(
                f"| {r['model']} | {p} × {n} | {count} | {sec / count * 1e3:.0f} ms | "
                f"{sec / count / (p * p * n) * 1e12:.1f} ps |"
            )
    restores = [r for r in result["runs"] if r.get("stage", "").startswith("restore") and "error" not in r]
    if restores:
        lines += [
            "",
            "| model | stage | matrix (out × in) | layers | solve per layer | solver (CG iterations, max) | "
            "output error masked → restored (mean) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in restores:
            per: dict[tuple, list] = {}
            for u in r["units"]:
                per.setdefault(tuple(u["shape"]), []).append(u)
            for shape, us in sorted(per.items()):
                solvers = "+".join(sorted({u["solver"] for u in us}))
                iters = max(u.get("iterations", 0) for u in us)
                before = sum(u.get("rel_error_before", float("nan")) for u in us) / len(us)
                after = sum(u.get("rel_error_after", float("nan")) for u in us) / len(us)
                lines.append(
                    f"| {r['model']} | {r['stage']} | {shape[0]} × {shape[1]} | {len(us)} | "
                    f"{sum(u['seconds'] for u in us) / len(us):.2f} s | {solvers} ({iters}) | {before:.3f} → {after:.3f} |"
                )
        lines += ["", "| model | stage | calibration tokens | block forwards + Grams | solves | replayed blocks |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in restores:
            lines.append(
                f"| {r['model']} | {r['stage']} | {r.get('calibration_tokens', '')} | "
                f"{r.get('grams_s', 0) + r.get('replay_s', 0):.1f} s | {r['solve_s']:.1f} s | {r.get('replayed_blocks', 0)} |"
            )
    proj = result.get("projection")
    if proj:
        lines += ["", "| projected (on paper) | params | bf16 weights | plan time | largest Gram (float32) |"]
        lines += ["|---|---|---|---|---|"]
        for name in PROJECTED:
            q = proj[name]
            lines.append(
                f"| {name} | {q['params'] / 1e9:.1f} B | {q['bf16_gib']:.1f} GiB | {q['plan_s'] / 60:.0f} min | "
                f"{q['largest_gram_mib_float32']:.0f} MiB |"
            )
    return "\n".join(lines) + "\n"


README = HERE / "README.md"
SCALE_START = "<!-- scale:start (generated by benchmarks/scale.py --table-only from results/scale.json) -->"
SCALE_END = "<!-- scale:end -->"


def readme_block(text: str) -> str | None:
    """The generated scale tables between the markers of ``benchmarks/README.md`` (None without markers)."""
    if SCALE_START not in text or SCALE_END not in text:
        return None
    return text.split(SCALE_START, 1)[1].split(SCALE_END, 1)[0].strip("\n") + "\n"


def write_readme_block(rendered: str) -> bool:
    """Replace the marked block of ``benchmarks/README.md`` with ``rendered``; False without markers."""
    text = README.read_text()
    if readme_block(text) is None:
        return False
    head, rest = text.split(SCALE_START, 1)
    tail = rest.split(SCALE_END, 1)[1]
    README.write_text(f"{head}{SCALE_START}\n{rendered}{SCALE_END}{tail}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="0.1b,0.5b,1.1b")
    ap.add_argument("--float64-models", default="1.1b", help="also time the float64 path on these")
    ap.add_argument("--legacy-models", default="0.1b", help="also time the pre-streaming code on these")
    ap.add_argument("--restore-models", default="0.1b,0.5b,1.1b", help="also time sequential restore on these")
    ap.add_argument(
        "--restore-extra-models", default="0.1b", help="also time restore in float64 and without block replay"
    )
    ap.add_argument("--name", default="scale")
    ap.add_argument("--table-only", action="store_true", help="rewrite results/<name>.md from results/<name>.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--legacy-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.threads, args.plan_path, args.legacy_dir)))
        return

    sys.path.insert(0, str(HERE))
    from common import RESULTS, write_result

    if args.table_only:
        rendered = table(json.loads((RESULTS / f"{args.name}.json").read_text()))
        (RESULTS / f"{args.name}.md").write_text(rendered)
        if args.name == "scale":
            write_readme_block(rendered)
        return

    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        legacy = Path(tmp) / "legacy"
        legacy.mkdir()
        archive = subprocess.run(["git", "archive", LEGACY, "mp_plugin"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(legacy)], input=archive.stdout, check=True)
        for name in split(args.models):
            plan_path = Path(tmp) / f"plan-{name}.json"
            stages = ["plan", "apply"]
            stages += ["plan-float64"] * (name in split(args.float64_models))
            stages += ["plan-legacy"] * (name in split(args.legacy_models))
            stages += ["restore"] * (name in split(args.restore_models))
            extra = ["restore-converged", "restore-float64", "restore-noreplay"]
            stages += extra * (name in split(args.restore_extra_models))
            for stage in stages:
                res = run_child(stage, name, args.threads, plan_path, legacy)
                if stage == "plan" and "error" not in res:
                    res["params_in_targets"] = sum(o * i for o, i in _layer_shapes(MODELS[name]))
                runs.append(res)
    plans = [r for r in runs if r.get("stage") == "plan" and "error" not in r]
    summary = {}
    for r in runs:
        if "error" in r:
            continue
        summary.setdefault(r["model"], {})[r["stage"]] = {
            "seconds": round(r["seconds"], 2),
            "cpu_seconds": round(r["cpu_seconds"], 2),
            "peak_rss_gib": round(r["peak_rss_gib"], 3),
            "model_gib": round(r["model_gib"], 3),
            "peak_over_model_gib": round(r["peak_over_model_gib"], 3),
        }
    big = summary.get("1.1b", {})
    targets = {"plan_peak_rss_le_model_plus_1gib": None, "plan_le_90_s": None, "float64_over_float32": None}
    if "plan" in big:
        targets["plan_peak_rss_le_model_plus_1gib"] = big["plan"]["peak_over_model_gib"] <= 1.0
        targets["plan_le_90_s"] = big["plan"]["seconds"] <= 90.0
        targets["plan_cpu_le_90_s"] = big["plan"]["cpu_seconds"] <= 90.0
        if "plan-float64" in big:
            targets["float64_over_float32"] = big["plan-float64"]["seconds"] / big["plan"]["seconds"]
            targets["float64_over_float32_cpu"] = big["plan-float64"]["cpu_seconds"] / big["plan"]["cpu_seconds"]
    small = summary.get("0.1b", {})
    if "restore" in small and "restore-noreplay" in small:
        targets["restore_noreplay_over_replay_0.1b"] = (
            small["restore-noreplay"]["seconds"] / small["restore"]["seconds"]
        )
    result = {
        "models": {k: MODELS[k] for k in split(args.models)},
        "vocab": VOCAB,
        "threads": args.threads,
        "summary": summary,
        "targets": targets,
        "issue_19_before": {"1.1b": {"plan_s": 244.0, "peak_rss_gib_reported": 18.4, "apply_s": 37.5}},
        "projection": project(plans) if plans else None,
        "runs": runs,
    }
    path = write_result(args.name, result, packages=("transformers",))
    path.with_suffix(".md").write_text(table(json.loads(path.read_text())))
    print(json.dumps({"summary": summary, "targets": targets}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
