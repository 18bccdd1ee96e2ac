"""Figures of the layer-budget benchmark, drawn from the committed ``results/budgets-*.json``.

* ``results/budgets-mix.png``: the dense/2:4 mix at equal removed weights: loss against the
  overall target (25/35/45 %) for choosing the 2:4 layers by size, by the data-free MP rule
  (``mp-bulk``) and by measurement on calibration data (``measured``, ``measured-restore``),
  without and with prune–restore; error bars ±2 SE of each row's paired difference to size.
* ``results/budgets-layers.png``: each layer's sparsity at 50 % under global magnitude, the
  ``mp-bulk`` default, the paper's SEB rule and the sensitivity oracle.

Nothing is rerun: ``python benchmarks/budgets_plot.py`` redraws both from the JSON files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MIX_MODELS = ("minilm", "efficientnet_lite0")  # the models where the rules pick different layers
LAYER_MODELS = ("minilm", "efficientnet_lite0", "fmnist_cnn")
MIX_LINES = {  # label in the figure: the row's method label in the JSON (equal weights)
    "size": "size (largest first) [equal weights]",
    "mp-bulk (data-free default)": "MP: mp-bulk damage (default) [equal weights]",
    "measured (default with data)": "measured on calibration data (rule `measured`) [equal weights]",
    "measured-restore": "measured after restore on calibration data (rule `measured-restore`) [equal weights]",
}
LAYER_LINES = ("global magnitude", "mp-bulk (bulk share weighting)", "SEB (paper)", "sensitivity oracle")
LOSS_NAME = {"minilm": "1 − embedding cosine", "efficientnet_lite0": "KL(dense ‖ pruned)", "fmnist_cnn": "KL"}


def _load(model: str, results: Path) -> dict[str, Any]:
    path = results / f"budgets-{model}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run benchmarks/budgets.py --models {model} first")
    return json.loads(path.read_text())


def mix_series(results: Path = RESULTS) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{model: {"plain"|"restore": {label: [loss at 25, 35, 45 %, then 2·SE at each]}}} from the JSON rows."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for model in MIX_MODELS:
        rows = _load(model, results)["rows"]
        out[model] = {}
        for restore, key in ((False, "plain"), (True, "restore")):
            series = {}
            for label, method in MIX_LINES.items():
                picked = {
                    r["setting"]: r
                    for r in rows
                    if r["part"] == "mix" and r["restore"] == restore and r["method"] == method
                }
                if set(picked) >= {"25%", "35%", "45%"}:
                    cells = [picked[s] for s in ("25%", "35%", "45%")]
                    series[label] = [c["loss"] for c in cells] + [2 * c.get("se_delta", 0.0) for c in cells]
            out[model][key] = series
    return out


def layer_series(results: Path = RESULTS) -> dict[str, dict[str, list[float]]]:
    """{model: {method: per-layer sparsity at 50 %, in the model's layer order}}."""
    out = {}
    for model in LAYER_MODELS:
        data = _load(model, results)
        budgets = data["budgets"]["50%"]
        out[model] = {m: [budgets[m][name] for name in data["layers"]] for m in LAYER_LINES if m in budgets}
    return out


def draw(results: Path = RESULTS, out_dir: Path = RESULTS) -> list[Path]:
    """Write ``budgets-mix.png`` and ``budgets-layers.png`` to ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    targets = [25, 35, 45]
    mix = mix_series(results)
    fig, axes = plt.subplots(len(MIX_MODELS), 2, figsize=(10, 3.6 * len(MIX_MODELS)), squeeze=False)
    for i, model in enumerate(MIX_MODELS):
        for j, key in enumerate(("plain", "restore")):
            ax = axes[i][j]
            for label, values in mix[model][key].items():
                ax.errorbar(targets, values[:3], yerr=values[3:], marker="o", capsize=3, label=label)
            ax.set_title(f"{model}, {'with prune–restore' if key == 'restore' else 'no restore'}")
            ax.set_xlabel("weights removed overall (%)")
            ax.set_ylabel(LOSS_NAME[model] + " ↓")
            ax.set_xticks(targets)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Dense/2:4 mix: which layers take 2:4 (equal removed weights; bars ±2 SE vs size)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    mix_path = out_dir / "budgets-mix.png"
    fig.savefig(mix_path, dpi=110)
    plt.close(fig)

    layers = layer_series(results)
    fig, axes = plt.subplots(len(LAYER_MODELS), 1, figsize=(10, 2.8 * len(LAYER_MODELS)), squeeze=False)
    for ax, model in zip(axes[:, 0], LAYER_MODELS):
        for method, values in layers[model].items():
            ax.plot(range(len(values)), values, marker=".", label=method)
        ax.set_title(f"{model}: per-layer sparsity at 50 % overall")
        ax.set_xlabel("layer (model order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    layers_path = out_dir / "budgets-layers.png"
    fig.savefig(layers_path, dpi=110)
    plt.close(fig)
    return [mix_path, layers_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of budgets-*.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder to write the PNGs to")
    args = parser.parse_args()
    for path in draw(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
