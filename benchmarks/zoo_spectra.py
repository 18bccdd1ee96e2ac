"""Spikes above the MP bulk in the Fashion-MNIST zoo: trained weights vs their initialisation.

For each zoo network (trained on first use and cached outside the repo), fit MP
to every Linear/Conv weight at initialisation and after training, and count the
singular values above σ₊. Writes benchmarks/results/zoo_spectra.json.

Usage: ``python benchmarks/zoo_spectra.py [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from mp_plugin.evaluation.zoo import ZOO, build_model, trained_model, zoo_record  # noqa: E402
from mp_plugin.layers.discovery import LayerSelection, find_target_layers  # noqa: E402
from mp_plugin.spectrum import fit_marchenko_pastur  # noqa: E402


def main() -> None:
    """Fit every layer of every zoo network before and after training; print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sel = LayerSelection(exclude_head=False, exclude_stem=False)
    out = {}
    for name in ZOO:
        t0 = time.perf_counter()
        trained, init = trained_model(name, show_progress=True), build_model(name)
        layers = []
        for lt, li in zip(find_target_layers(trained, sel)[0], find_target_layers(init, sel)[0]):
            ft, fi = fit_marchenko_pastur(lt.module.weight.detach()), fit_marchenko_pastur(li.module.weight.detach())
            layers.append({
                "name": lt.name, "shape": list(lt.shape), "spikes_init": fi.n_spikes, "spikes_trained": ft.n_spikes,
                "sigma_plus_init": fi.sigma_plus, "sigma_plus_trained": ft.sigma_plus,
                "top_sv_over_edge_trained": float(ft.singular_values[0] / ft.sigma_plus),
            })  # fmt: skip
            print(
                f"{name:11s} {lt.name:18s} {str(lt.shape):12s} spikes init {fi.n_spikes:3d}  trained {ft.n_spikes:3d}"
            )
        out[name] = {"training": zoo_record(name), "layers": layers, "seconds_here": time.perf_counter() - t0}
    path = write_result("zoo_spectra", {"threads": args.threads, "loadavg_at_end": list(os.getloadavg()), "zoo": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
