"""The core API in a few lines: fit, plan, apply, keep masks, certify.

Run: python examples/python_api.py
"""

import copy

import torch

import mp_plugin as mp
from mp_plugin.models import load_model
from mp_plugin.photos import real_photo_crops

torch.set_num_threads(2)
model = load_model("efficientnet_lite0")
dense = copy.deepcopy(model)
x = real_photo_crops(16, 160)

fit = mp.fit_marchenko_pastur(model._blocks[10]._expand_conv.weight)
print(f"σ={fit.sigma:.4f} σ₊={fit.sigma_plus:.3f} spikes={fit.n_spikes} bulk={fit.bulk_fraction:.1%}")

plan = mp.plan(model, sparsity=0.5, pattern="2:4", method="seb")  # decide ...
print(plan.to_table(max_rows=5))
mp.apply(
    model, plan, calibration=x[:8], method="cast"
)  # ... then apply (permute="swap" also folds a channel permutation)
keeper = mp.MaskKeeper(model)  # masks survive optimiser steps: keeper.attach(optimizer)
print(mp.sparsity_report(model, plan).to_table(max_rows=3))

cert = mp.certify(dense, model, x[8:], mode="empirical")
print(cert.summary(max_layers=3))
