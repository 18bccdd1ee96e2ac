"""Two-process DDP (gloo on CPU) under torchrun: masks and weights stay identical across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_data import make_image_folder

pytest.importorskip("timm")
pytest.importorskip("PIL")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HERE = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    )
    return env


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=12)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "ddp_worker.py"), str(data), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # gloo's known abort while a process tears down its threads (seen once in ~20 runs): run once more
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    assert r0["steps"] == r1["steps"] == 4
    assert set(r0["seen"]).isdisjoint(r1["seen"])  # the DistributedSampler sharded the data
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert set(r0["masks"]) == set(r1["masks"]) and r0["masks"]
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
        assert torch.equal(mask, r0["initial"][f"{name}.weight"] != 0)  # masks unchanged by training
    changed = [k for k, v in r0["state"].items() if v.is_floating_point() and not torch.equal(v, r0["initial"][k])]
    assert "conv2.weight" in changed  # it trained
    assert r0["val"] == r1["val"]  # validation metrics are reduced over ranks
