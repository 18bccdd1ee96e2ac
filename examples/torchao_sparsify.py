"""torchao route: one line prunes the real MiniLM encoder to 2:4 with whole-model MP budgets.

Run: python examples/torchao_sparsify.py
"""

import copy

import torch
import torchao.sparsity

import mp_plugin as mp
from mp_plugin.evaluation.metrics import embedding_retention
from mp_plugin.evaluation.models import load_model

torch.set_num_threads(2)
model = load_model("minilm")  # real pretrained all-MiniLM-L6-v2, shipped offline
dense = copy.deepcopy(model)
texts = ["a dog runs on the beach", "the stock market fell today", "how do I bake bread?", "a cat sleeps"]

config = mp.MPSparsifier(sparsity=0.5, pattern="2:4")
torchao.sparsity.sparsify_(model, config)  # the one line (torchao 0.18); torchao.quantize_ works the same

print(mp.sparsity_report(model, config.plan_for(model)).to_table(max_rows=6))
print("embedding retention vs dense:", embedding_retention(dense.encode(texts), model.encode(texts)))
