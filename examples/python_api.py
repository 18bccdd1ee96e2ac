"""The core API in a few lines: fit, plan, apply, keep masks, certify; and the deployable dense/2:4 mix.

Run: python examples/python_api.py   (MP_PLUGIN_EXAMPLE_QUICK=1: fewer, smaller crops — what the tests run)
"""

import copy
import os

import torch

import mp_plugin as mp
from mp_plugin.evaluation.models import load_model
from mp_plugin.evaluation.photos import real_photo_crops

torch.set_num_threads(2)
model = load_model("efficientnet_lite0")
dense = copy.deepcopy(model)
quick = os.environ.get("MP_PLUGIN_EXAMPLE_QUICK") == "1"
x = real_photo_crops(8 if quick else 16, 96 if quick else 160)

fit = mp.fit_marchenko_pastur(model._blocks[10]._expand_conv.weight)
print(f"σ={fit.sigma:.4f} σ₊={fit.sigma_plus:.3f} spikes={fit.n_spikes} bulk={fit.bulk_fraction:.1%}")

plan = mp.plan(model, sparsity=0.5, pattern="2:4", budget="seb")  # decide: SEB budgets ...
print(plan.to_table(max_rows=5))
half = len(x) // 2
mp.apply(model, plan, calibration=x[:half], projection="cast")  # ... apply: CAST k:n projection (permute="swap" too)
keeper = mp.MaskKeeper(model)  # masks survive optimiser steps: keeper.attach(optimizer)
print(mp.sparsity_report(model, plan).to_table(max_rows=3))

cert = mp.certify(dense, model, x[half:], mode="empirical")  # measured; mode="bound" is the proven one
print(cert.summary(max_layers=3))

# the deployable dense/2:4 mix at 30 % removed: whole layers take 2:4; with calibration data the layers
# are chosen by their 2:4 damage measured on it (mix rule "measured"), without it by the MP rule "mp-bulk"
mix = mp.plan(dense, 0.3, "auto", config=mp.PlanConfig(auto_patterns=("dense", "2:4")), calibration=x[:half])
n24 = sum(lp.pattern == "2:4" for lp in mix.layers)
print(
    f"dense/2:4 mix ({mix.config.mix_rule}): {n24} of {len(mix.layers)} layers 2:4, {mix.planned_sparsity:.1%} removed"
)
