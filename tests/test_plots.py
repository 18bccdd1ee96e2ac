"""esd.png and budgets.png say what they show: named layers, legend colours = bar colours, log ESD with edge and spikes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mp_plugin as mp

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgba  # noqa: E402
from mp_plugin.integrations.plotting import TYPE_COLORS, budget_figure, esd_figure  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, d)
        self.proj_other = nn.Linear(d, d)
        with torch.no_grad():
            for lin in (self.attn.qkv, self.mlp.fc1, self.proj_other):
                u, v = torch.randn(d, 1, generator=g), torch.randn(1, d, generator=g)
                lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5 + 3 * u @ v / d)  # noise + one spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_other(self.mlp.fc1(self.attn.qkv(x)))


def _plan(blocks: int) -> mp.PrunePlan:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[Block(48, g) for _ in range(blocks)])
    return mp.plan(model, 0.5, "unstructured", "seb", model_name="toy")


def test_budget_legend_colours_are_the_bar_colours_and_layers_are_named() -> None:
    p = _plan(2)
    fig = budget_figure(p)
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == len(p.layers)
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    for bar, lp in zip(bars, p.layers):
        assert bar.get_facecolor() == to_rgba(TYPE_COLORS[lp.layer_type])
        assert legend[lp.layer_type].get_facecolor() == bar.get_facecolor(), lp.layer_type
    assert {"attn", "mlp", "other"} <= set(legend)
    assert [t.get_text() for t in ax.get_xticklabels()] == [lp.name for lp in p.layers]


def test_esd_is_log_scale_marks_edge_and_spikes_and_says_which_layers() -> None:
    p = _plan(2)  # 6 layers: all shown
    fig = esd_figure(p)
    shown = [ax for ax in fig.axes if ax.get_title()]
    assert len(shown) == len(p.layers) and "all 6 fitted layers" in fig._suptitle.get_text()
    for ax, lp in zip(shown, p.layers):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert ax.get_title().startswith(lp.name)
        labels = ax.get_legend_handles_labels()[1]
        assert "fitted edge σ₊²/n" in labels
        if lp.fit.n_spikes:
            assert "spikes" in labels
    assert sum(lp.fit.n_spikes > 0 for lp in p.layers) >= 4  # the planted spikes are found and drawn
    many = _plan(3)  # 9 layers > max_layers: an evenly spaced subset, and the title says so
    fig = esd_figure(many, max_layers=4)
    titled = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    assert len(titled) == 4 and "4 of 9 fitted layers" in fig._suptitle.get_text()
    assert titled[0] == many.layers[0].name and titled[-1] == many.layers[-1].name
