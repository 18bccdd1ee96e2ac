"""Tables and the default's test for ``benchmarks/budgets.py`` (issue 17), from its results JSON only.

Kept apart from the benchmark so that the README check (``tests/test_readme.py``) can
re-render the committed tables without torch or the models: :func:`readme_block` is
the block between the ``budgets:begin``/``budgets:end`` markers of benchmarks/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, read_marked_block, write_marked_block  # noqa: E402

BUDGETS = (
    ("uniform", "uniform"),
    ("global magnitude", "magnitude"),
    ("SEB (paper)", "seb"),
    ("alpha (AlphaPruning map)", "alpha"),
    ("bounded bulk energy", "bounded-bulk-energy"),
    ("bounded spikes/dim", "bounded-spikes"),
    ("bounded edge/iid", "bounded-edge"),
    ("OWL (calibration)", "owl"),
    ("noise floor (calibration)", "noise-floor"),
    ("mag + alpha", "mag-alpha"),
    ("mag + bulk energy", "mag-bulk-energy"),
    ("mag + spikes/dim", "mag-spikes"),
    ("mag + edge/iid", "mag-edge"),
    ("mag + noise floor (calibration)", "mag-noise-floor"),
    ("mp-bulk (bulk share weighting)", "mp-bulk"),
    ("sensitivity oracle", None),
)
# (label, mix rule, budget whose per-layer sparsities the "budget" rule ranks by)
# an optional 4th entry is the mix damage's β (BulkShareConfig.mix_beta; default 0.25)
MIX_RULES = (
    ("MP: mp-bulk damage (default)", "mp-bulk", "magnitude"),
    ("MP: mp-bulk damage, β = 0.5", "mp-bulk", "magnitude", 0.5),
    ("MP: mp-bulk damage, β = 1.0", "mp-bulk", "magnitude", 1.0),
    ("MP: 2:4 energy / noise", "mp", "magnitude"),
    ("MP: bulk energy", "bulk-energy", "magnitude"),
    ("size (largest first)", "size", "magnitude"),
    ("global-magnitude budget", "budget", "magnitude"),
    ("MP: mp-bulk budget", "budget", "mp-bulk"),
    ("measured 2:4 sensitivity", "scores", "magnitude"),
    ("measured on calibration data (rule `measured`)", "measured", "magnitude"),
    ("measured after restore on calibration data (rule `measured-restore`)", "measured-restore", "magnitude"),
)
BETA_SWEEP = (0.5, 1.0)  # extra mp-bulk rows besides the default β = 0.25
VERDICT_MODELS = ("fmnist_cnn", "efficientnet_lite0", "minilm")  # the three; others are held out


DATA_FREE = (
    "seb",
    "alpha",
    "bounded-bulk-energy",
    "bounded-spikes",
    "bounded-edge",
    "mag-alpha",
    "mag-bulk-energy",
    "mag-spikes",
    "mag-edge",
    "mp-bulk",
    *(f"mp-bulk beta={b}" for b in BETA_SWEEP),
)


def default_verdict(results: list[dict], restore: bool = False) -> dict[str, dict]:
    """For each budget: on how many (model, sparsity) it is not worse / better than global magnitude.

    Not worse: Δ ≤ SE (the loss difference to global magnitude within one standard error
    of the paired evaluation-sample difference); better: Δ < −2·SE. Only the models of
    :data:`VERDICT_MODELS` count; any other model is a held-out check.
    """
    out: dict[str, dict] = {}
    for res in results:
        if res["model"] not in VERDICT_MODELS:
            continue
        for r in res["rows"]:
            if r["part"] != "unstr" or r["restore"] != restore or "delta_vs_reference" not in r:
                continue
            v = out.setdefault(
                r["budget"], {"cases": 0, "not_worse": 0, "better": 0, "worse_in": [], "models_better": []}
            )
            v["cases"] += 1
            d, se = r["delta_vs_reference"], r["se_delta"]
            if d <= se:
                v["not_worse"] += 1
            else:
                v["worse_in"].append(f"{res['model']} {r['setting']}")
            if d < -2 * se:
                v["better"] += 1
                if res["model"] not in v["models_better"]:
                    v["models_better"].append(res["model"])
    for v in out.values():
        v["qualifies"] = v["not_worse"] == v["cases"] and v["better"] > v["cases"] / 2 and len(v["models_better"]) >= 2
    return out


def qualifies_as_default(plain: dict, restored: dict | None) -> bool:
    """The default's test: one-shot not worse everywhere and better on most cases and on ≥ 2 models,
    and after prune–restore not worse anywhere (a default must not hurt the restore route)."""
    if not plain.get("qualifies"):
        return False
    return restored is not None and restored["not_worse"] == restored["cases"]


def verdict_markdown(results: list[dict]) -> str:
    """The qualification table of the default budget (without restore and with restore)."""
    lines = [
        "| budget | data | not worse than global magnitude (no restore) | better | better on models "
        "| not worse (+restore) | better (+restore) | worse in (+restore) | qualifies as default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain, rest = default_verdict(results, False), default_verdict(results, True)
    for budget, v in plain.items():
        w = rest.get(budget)
        data = "data-free" if budget in DATA_FREE or budget in ("uniform",) else "calibration"
        ok = qualifies_as_default(v, w) and data == "data-free"
        w = w or {}
        lines.append(
            f"| {budget} | {data} | {v['not_worse']}/{v['cases']} | {v['better']}/{v['cases']} | "
            f"{', '.join(v['models_better']) or '-'} | {w.get('not_worse', 0)}/{w.get('cases', 0)} | "
            f"{w.get('better', 0)}/{w.get('cases', 0)} | {', '.join(w.get('worse_in', [])) or '-'} | "
            f"{'yes' if ok else 'no'} |"
        )
    return "\n".join(lines) + "\n"


MIX_DEFAULT_LABEL = "MP: mp-bulk damage (default)"
COMPARABLE_REMOVED = 0.02  # removed-weight fractions further apart than this are not "equal removed weights"
MIX_REFERENCE_LABEL = "size (largest first)"


def mix_verdict(results: list[dict], equal: str = "weights") -> list[dict]:
    """The mix target: the default MP choice of 2:4 layers against choosing by size, per model × setting.

    Each entry: model, setting, restore, the two losses, Δ ± SE (paired over the evaluation
    samples) and the outcome: ``better`` (Δ < −2 SE), ``same layers`` (both rules chose the
    same set), ``not worse`` (Δ ≤ SE), ``worse``, or ``not comparable`` when the removed
    fractions differ by more than :data:`COMPARABLE_REMOVED` (a network with a few very
    unequal layers cannot reach the target with either rule).
    """
    out = []
    for res in results:
        mix = [x for x in res["rows"] if x["part"] == "mix"]
        for s in dict.fromkeys(x["setting"] for x in mix):
            for restore in (False, True):
                pick = {
                    x["method"]: x
                    for x in mix
                    if x["setting"] == s and x["restore"] == restore and x["method"].endswith(f"[equal {equal}]")
                }
                mp, ref = (
                    pick.get(f"{MIX_DEFAULT_LABEL} [equal {equal}]"),
                    pick.get(f"{MIX_REFERENCE_LABEL} [equal {equal}]"),
                )
                if mp is None or ref is None:
                    continue
                same = mp.get("same_layers_as") == ref["method"]
                d, se = (0.0, 0.0) if same else (mp.get("delta_vs_reference", 0.0), mp.get("se_delta", 0.0))
                if same:
                    outcome = "same layers"
                elif abs(mp["removed_fraction"] - ref["removed_fraction"]) > COMPARABLE_REMOVED:
                    outcome = "not comparable (removed differs)"
                else:
                    outcome = "better" if d < -2 * se else "not worse" if d <= se else "worse"
                out.append(
                    {
                        "model": res["model"],
                        "setting": s,
                        "restore": restore,
                        "mp": mp["loss"],
                        "size": ref["loss"],
                        "removed_mp": mp["removed_fraction"],
                        "removed_size": ref["removed_fraction"],
                        "delta": d,
                        "se": se,
                        "outcome": outcome,
                    }
                )
    return out


def mix_verdict_markdown(results: list[dict]) -> str:
    """The mix target's table: default MP choice vs size at equal removed weights."""
    lines = [
        "| model | target | restore | MP (`mp-bulk` damage) | size | Δ ± SE | removed MP / size | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in mix_verdict(results):
        held = "" if v["model"] in VERDICT_MODELS else " (held out)"
        lines.append(
            f"| {v['model']}{held} | {v['setting']} | {'yes' if v['restore'] else 'no'} | {_short(v['mp'])} | "
            f"{_short(v['size'])} | {v['delta']:+.4f} ± {v['se']:.4f} | {v['removed_mp']:.3f} / "
            f"{v['removed_size']:.3f} | {v['outcome']} |"
        )
    return "\n".join(lines) + "\n"


def to_markdown(results: list[dict]) -> str:
    """Tables: unstructured (loss per setting, without / with restore) and the mix."""
    out = []
    for res in results:
        rows = res["rows"]
        held = "" if res["model"] in VERDICT_MODELS else " — held out (not counted in the default's test)"
        out.append(f"### {res['model']}: loss = {res['loss']} (lower is better; Δ vs global magnitude ± SE){held}\n")
        settings = list(dict.fromkeys(x["setting"] for x in rows if x["part"] == "unstr"))
        out.append("| budget | " + " | ".join(f"{s} | {s} +restore" for s in settings) + " |")
        out.append("|---|" + "---|---|" * len(settings))
        labels = [label for label, _ in BUDGETS]
        labels[labels.index("mp-bulk (bulk share weighting)") + 1 : 0] = [f"mp-bulk, β = {b}" for b in BETA_SWEEP]
        for label in labels:
            cells = []
            for s in settings:
                for restore in (False, True):
                    r = next(
                        (
                            x
                            for x in rows
                            if x["part"] == "unstr"
                            and x["setting"] == s
                            and x["method"] == label
                            and x["restore"] == restore
                        ),
                        None,
                    )
                    if r is None:
                        cells.append("")
                    elif "delta_vs_reference" in r:
                        cells.append(f"{r['loss']:.4f} ({r['delta_vs_reference']:+.4f}±{r['se_delta']:.4f})")
                    else:
                        cells.append(f"{r['loss']:.4f}")
            if any(cells):
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        mix = [x for x in rows if x["part"] == "mix"]
        if mix:
            out.append("")
            out.append(f"Dense/2:4 mix ({res['model']}): loss (removed weights / saved MACs of the whole forward)\n")
            msets = list(dict.fromkeys(x["setting"] for x in mix))
            out.append("| 2:4 layers chosen by | " + " | ".join(f"{s} | {s} +restore" for s in msets) + " |")
            out.append("|---|" + "---|---|" * len(msets))
            for label in dict.fromkeys(x["method"] for x in mix):
                cells = []
                for s in msets:
                    for restore in (False, True):
                        r = next(
                            (x for x in mix if x["setting"] == s and x["method"] == label and x["restore"] == restore),
                            None,
                        )
                        cells.append(
                            ""
                            if r is None
                            else f"{r['loss']:.4f} ({r['removed_fraction']:.2f}/{r.get('saved_mac_fraction', 0):.2f})"
                        )
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def correlation_markdown(results: list[dict]) -> str:
    """ρ of each MP signal with the single-layer sensitivity (50 % unstructured / 2:4), per model."""
    lines = ["| model | signal | ρ vs 50 % sensitivity | ρ vs 2:4 sensitivity |", "|---|---|---|---|"]
    for res in results:
        for sig, rho in res.get("signal_vs_sensitivity", {}).items():
            lines.append(
                f"| {res['model']} | {sig} | {rho.get('50%', float('nan')):+.2f} | {rho.get('2:4', float('nan')):+.2f} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the README block

MARK_BEGIN, MARK_END = "<!-- budgets:begin -->", "<!-- budgets:end -->"
SEEDS_BEGIN, SEEDS_END = "<!-- budget-seeds:begin -->", "<!-- budget-seeds:end -->"
README_MODELS = ("minilm", "efficientnet_lite0", "fmnist_cnn")


def load_results(root: Path = RESULTS) -> list[dict]:
    """Every ``budgets-<model>.json`` under ``root``, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted(root.glob("budgets-*.json"))]


def _short(x: float) -> str:
    return f"{x:.3g}"


def _marked(r: dict) -> str:
    """Loss to 3 digits; **bold** if better than global magnitude by > 2 SE, *italic* if worse by > 1 SE."""
    text = _short(r["loss"])
    d, se = r.get("delta_vs_reference"), r.get("se_delta")
    if d is None:
        return text
    return f"**{text}**" if d < -2 * se else f"*{text}*" if d > se else text


def _ordered(results: list[dict]) -> list[dict]:
    by = {r["model"]: r for r in results}
    return [by[m] for m in README_MODELS if m in by] + [r for r in results if r["model"] not in README_MODELS]


def unstructured_table(results: list[dict], restore: bool) -> str:
    """One row per budget, one column per model × sparsity (held-out models last, marked)."""
    res = _ordered(results)
    cols = []
    for r in res:
        held = "" if r["model"] in VERDICT_MODELS else " (held out)"
        for s in dict.fromkeys(x["setting"] for x in r["rows"] if x["part"] == "unstr"):
            cols.append((r, s, f"{r['model']}{held} {s}"))
    budgets = list(
        dict.fromkeys(x["budget"] for r in res for x in r["rows"] if x["part"] == "unstr" and x["restore"] == restore)
    )
    budgets.sort(key=lambda b: b != "magnitude")
    lines = ["| budget | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for b in budgets:
        cells = []
        for r, s, _ in cols:
            row = next(
                (
                    x
                    for x in r["rows"]
                    if x["part"] == "unstr" and x["setting"] == s and x["budget"] == b and x["restore"] == restore
                ),
                None,
            )
            cells.append("" if row is None else _marked(row))
        lines.append(f"| `{b}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mix_table(res: dict) -> str:
    """The dense/2:4 mix of one model: loss without / with restore (removed weights, saved MACs)."""
    mix = [x for x in res["rows"] if x["part"] == "mix"]
    settings = list(dict.fromkeys(x["setting"] for x in mix))
    lines = ["| 2:4 layers chosen by | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for label in dict.fromkeys(x["method"] for x in mix):
        cells = []
        for s in settings:
            pair = {x["restore"]: x for x in mix if x["setting"] == s and x["method"] == label}
            if False not in pair:
                cells.append("")
                continue
            a = pair[False]
            after = f" / {_short(pair[True]['loss'])}" if True in pair else ""
            cells.append(
                f"{_short(a['loss'])}{after} ({a['removed_fraction']:.2f}, MACs {a.get('saved_mac_fraction', 0):.2f})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def readme_block(results: list[dict]) -> str:
    """The generated part of benchmarks/README.md's "Layer budgets" section (markers excluded)."""
    key = "(loss; **bold** = better than global magnitude by > 2 SE, *italic* = worse by > 1 SE)"
    out = [
        f"Without restore {key}:\n",
        unstructured_table(results, False),
        f"With restore {key}:\n",
        unstructured_table(results, True),
    ]
    for res in _ordered(results):
        if any(x["part"] == "mix" for x in res["rows"]):
            out.append(
                f"Dense/2:4 mix, {res['model']} (loss without / with restore; removed-weight fraction, "
                "saved MACs of the whole forward):\n"
            )
            out.append(mix_table(res))
    out.append("The mix target: the default MP choice of 2:4 layers against size, at equal removed weights:\n")
    out.append(mix_verdict_markdown(results))
    out.append(f"Which budget qualifies as the default (counted on {', '.join(VERDICT_MODELS)}):\n")
    out.append(verdict_markdown(results))
    out.append("MP signals against the measured single-layer sensitivity (Spearman ρ over the layers):\n")
    out.append(correlation_markdown(results))
    return "\n".join(out)


def readme_section(text: str) -> str | None:
    """The generated block of ``text`` between the markers (None when they are missing)."""
    return read_marked_block(text, MARK_BEGIN, MARK_END)


def write_readme(path: Path, results: list[dict]) -> None:
    """Replace the block between the markers of ``path`` with :func:`readme_block`."""
    write_marked_block(path, MARK_BEGIN, MARK_END, readme_block(results))


# --------------------------------------------------------------------------- budget_seeds.py


def seeds_markdown(result: dict) -> str:
    """The README table: mean Δ ± seed sd per comparison, model and sparsity."""
    lines = [
        "| comparison | model | target | seeds | mean Δ (candidate − reference) | sd over seeds "
        "| mean SE within a seed | seeds where the candidate is worse | better by more than the seed spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "unstructured": "`mp-bulk` budget vs global magnitude",
        "mix": "2:4 mix: `mp-bulk` damage vs size",
        "mix measured": "2:4 mix: `measured` on calibration data (not MP) vs size",
    }
    for v in result["summary"]:
        same = f" (same layers in {v['same_layers_seeds']})" if v.get("same_layers_seeds") else ""
        part = v.get("part", "unstructured")
        name = names.get(part) or f"2:4 mix: `mp-bulk` damage at β = {part.split('=')[1]} vs size"
        lines.append(
            f"| {name} | {v['model']} | {int(round(100 * v['sparsity']))}% | "
            f"{v['seeds']} | {v['mean_delta']:+.4g} | {v['sd_delta']:.3g} | {v['mean_se_within_seed']:.3g} | "
            f"{v['worse_seeds']}{same} | {'yes' if v['better_beyond_spread'] else 'no'} |"
        )
    what = "; ".join(f"{k}: {v}" for k, v in result["seed_changes"].items())
    return "\n".join(lines) + f"\n\nWhat a seed changes — {what}.\n"


def seeds_block(root: Path = RESULTS) -> str | None:
    """The README block of ``budget_seeds.py`` from ``results/budget_seeds.json`` (None when it is missing)."""
    path = root / "budget_seeds.json"
    return seeds_markdown(json.loads(path.read_text())) if path.exists() else None
