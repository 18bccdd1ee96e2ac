"""Every certificate says what it is: proven (bound), estimated (jacobian) or measured (empirical)."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.certificate import MODE_CLAIMS, certify, certify_auto
from mp_plugin.evaluation.pipeline import describe_preserved


def _pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    pruned = copy.deepcopy(dense)
    mp.apply(pruned, mp.plan(pruned, 0.2, "unstructured", "magnitude"))
    return dense, pruned, torch.randn(12, 16)


def test_each_mode_carries_its_claim_in_summary_json_and_plot(tmp_path) -> None:
    dense, pruned, x = _pair()
    for mode, claim in MODE_CLAIMS.items():
        cert = certify(dense, pruned, x, mode=mode, sequential=mode == "bound")
        assert cert.claim == claim, mode
        assert cert.summary().splitlines()[0].startswith(f"certificate: {claim.upper()} (mode={mode}")
        assert json.loads(json.dumps(cert.to_dict(per_sample=False)))["claim"] == claim
    # bound mode on several layers without sequential bounds each layer in the dense network: only estimated
    assert certify(dense, pruned, x, mode="bound").claim == "estimated"


def test_auto_is_proven_where_the_bound_runs_and_says_so_where_it_cannot() -> None:
    dense, pruned, x = _pair()
    lines: list[str] = []
    cert = certify_auto(dense, pruned, x, log=lines.append)
    assert cert.claim == "proven" and cert.mode == "bound" and not lines

    class Residual(nn.Module):  # custom forward: the bound cannot follow it
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.body(t) + 0.0 * t.sum(1, keepdim=True)

    cert = certify_auto(Residual(dense), Residual(pruned), x, log=lines.append)
    assert cert.claim == "measured" and cert.mode == "empirical"
    assert len(lines) == 1 and "cannot run on this model" in lines[0] and "measured (empirical)" in lines[0]
    assert any(n.startswith("fallback from bound mode") for n in cert.notes)


def test_main_job_wording_follows_the_claim() -> None:
    assert "provably" in describe_preserved(0.5, "proven")
    for claim in ("estimated", "measured"):
        text = describe_preserved(0.5, claim)
        assert "provabl" not in text and claim in text
