"""Small networks shared by the permutation-folding tests (bad inputs and fuzzing)."""

from __future__ import annotations

import torch
from torch import nn


class FunctionalUse(nn.Module):
    """The consumer's weight is also used functionally: folding a permutation would change that use."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)
        self.c = nn.Parameter(torch.randn(4, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + nn.functional.linear(self.c, self.b.weight).sum()
