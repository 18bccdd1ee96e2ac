"""ModelOpt route: mode "mp" (2:4 with MP budgets), kd_loss distillation that keeps the masks, export.

Uses the real MiniLM encoder (ModelOpt converts exact nn.Linear / nn.Conv2d classes only).
Run: python examples/modelopt_distill.py   (MP_PLUGIN_EXAMPLE_QUICK=1: 2 distillation steps)
"""

import copy
import os

import modelopt.torch.distill as mtd
import modelopt.torch.opt as mto
import modelopt.torch.sparsity as mts
import mp_plugin.integrations.modelopt as mpm  # registers the "mp" mode
import torch

import mp_plugin as mp
from mp_plugin.evaluation.metrics import embedding_retention
from mp_plugin.evaluation.models import load_model

torch.set_num_threads(2)
teacher = load_model("minilm")
texts = [
    "a dog runs on the beach",
    "the stock market fell today",
    "how do I bake bread?",
    "a cat sleeps on the sofa",
    "rain is expected tomorrow",
    "the team won the final",
    "she plays the violin",
    "prices of houses keep rising",
]
tok = teacher.tokenizer(texts, padding=True, return_tensors="pt")
batch = (tok["input_ids"], tok["attention_mask"])

student = mts.sparsify(copy.deepcopy(teacher), mode="mp", config={"sparsity": 0.5, "pattern": "2:4"})
print("2:4, before distillation:", embedding_retention(teacher.encode(texts), student.encode(texts)))

kd = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterion": torch.nn.MSELoss()})])
opt = torch.optim.AdamW([p for p in kd.parameters() if p.requires_grad], lr=2e-4)
kd.train()
for step in range(2 if os.environ.get("MP_PLUGIN_EXAMPLE_QUICK") == "1" else 10):
    opt.zero_grad()
    kd(*batch)
    loss = kd.compute_kd_loss()
    loss.backward()
    opt.step()
    print(f"kd step {step}: loss {loss.item():.5f}")
kd.eval()
out = os.environ.get("MP_PLUGIN_EXAMPLE_OUT", "/tmp")
mto.save(kd, os.path.join(out, "mp_modelopt_student.pth"))  # restore: mpm.restore, then mpm.plan_of works again
plain = mts.export(mtd.export(kd))  # export order with distillation: mtd, then mts
print("2:4, after distillation:", embedding_retention(teacher.encode(texts), plain.encode(texts)))
print(mp.sparsity_report(plain, mpm.plan_of(plain)).to_table(max_rows=4))  # the plan lives in ModelOpt's state
