"""torch.ao.pruning route: MP budgets in prepare(), masks held through training, squash_mask() to finish.

Fine-tunes the real EfficientNet-Lite0 for a few steps towards its own dense outputs on real photos.
Run: python examples/torch_ao_pruning.py   (MP_PLUGIN_EXAMPLE_QUICK=1: fewer steps and crops)
"""

import copy
import os

import torch
import torch.nn.functional as F
from mp_plugin.integrations.torch_ao_pruner import MPPruningSparsifier

import mp_plugin as mp
from mp_plugin.evaluation.metrics import batched_outputs, output_fidelity
from mp_plugin.evaluation.models import load_model
from mp_plugin.evaluation.photos import real_photo_crops

torch.set_num_threads(2)
model = load_model("efficientnet_lite0")
dense = copy.deepcopy(model)
quick = os.environ.get("MP_PLUGIN_EXAMPLE_QUICK") == "1"
n, side, steps = (8, 96, 2) if quick else (32, 160, 5)
x_train, x_test = real_photo_crops(n, side, seed=0), real_photo_crops(n, side, seed=1)

sparsifier = MPPruningSparsifier(sparsity=0.3, pattern="unstructured", budget="seb")
sparsifier.prepare(model, config=None)
print("before fine-tuning:", output_fidelity(batched_outputs(dense, x_test), batched_outputs(model, x_test)))

opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
with torch.no_grad():
    targets = dense(x_train).softmax(-1)
model.train()
for step in range(steps):
    opt.zero_grad()
    loss = F.cross_entropy(model(x_train), targets)
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.3f}")
model.eval()
sparsifier.squash_mask()
print("after:", output_fidelity(batched_outputs(dense, x_test), batched_outputs(model, x_test)))
print(mp.sparsity_report(model, sparsifier.plan).to_table(max_rows=4))
