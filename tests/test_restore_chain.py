"""Sequential restore on cached block inputs (mp_plugin.restore.chain, issue 19).

The replayed path must give the same weights as the ordinary one (a forward of the
model up to every block), run each block a bounded number of times, and fall back
where the model's dataflow does not allow replay.
"""

from __future__ import annotations

import copy

import pytest
import torch
from decoders import decoder
from torch import nn

import mp_plugin as mp
import mp_plugin.restore.driver as driver
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.restore import RestoreConfig
from mp_plugin.restore.chain import block_runs

torch.set_num_threads(1)


def _no_runs(keys, blocks):  # noqa: ANN001, ANN202 - the ordinary path, for reference
    return []


def _restored(model: nn.Module, calib, monkeypatch, replay: bool, **plan_kw) -> tuple[nn.Module, mp.PrunePlan]:
    model = copy.deepcopy(model)
    with monkeypatch.context() as m:
        if not replay:
            m.setattr(driver, "block_runs", _no_runs)
        p = mp.plan(model, **plan_kw)
        mp.apply(model, p, calib, restore=RestoreConfig(sequential=True))
    return model, p


def _spy_replays(monkeypatch) -> list[list[str]]:  # noqa: ANN001
    """Record the blocks ``replay_run`` yields (replayed on cached inputs) from now on."""
    real = driver.replay_run
    replayed: list[list[str]] = []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for item in real(*args, **kwargs):
            replayed.append(item[0])
            yield item

    monkeypatch.setattr(driver, "replay_run", spy)
    return replayed


def _calls(module: nn.Module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda mod, args: count.__setitem__(0, count[0] + 1))
    return count


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")


def test_block_runs_groups_consecutive_sibling_blocks() -> None:
    keys = ["stem", "model.layers.0", "model.layers.1", "model.layers.2", "head", "x.3", "x.5"]
    blocks = [["stem"], ["model.layers.0.a"], ["model.layers.1.a", "model.layers.1.b"], ["model.layers.2.a"]]
    blocks += [["head"], ["x.3.a"], ["x.5.a"]]
    assert block_runs(keys, blocks) == [(1, 4)]  # x.3 and x.5 are not consecutive
    assert block_runs(["a.0", "a.1"], [["a.0.w"], ["elsewhere"]]) == []  # a layer outside its block


def test_llama_replay_equals_the_full_forward_path_and_runs_each_block_a_bounded_number_of_times(
    monkeypatch,
) -> None:
    dense = decoder("llama", layers=4)
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(8, 48, dtype=torch.long)
    mask[2, 30:] = 0  # padding: only real tokens count in both paths
    calib = [
        {"input_ids": torch.randint(0, 256, (8, 48), generator=g), "attention_mask": mask},
        {"input_ids": torch.randint(0, 256, (8, 48), generator=g), "attention_mask": torch.ones(8, 48)},
    ]
    kw = dict(sparsity=0.5, pattern="2:4")
    calls = {}
    for replay in (True, False):
        model = copy.deepcopy(dense)
        counts = [_calls(layer) for layer in model.model.layers]
        with monkeypatch.context() as m:
            if not replay:
                m.setattr(driver, "block_runs", _no_runs)
            p = mp.plan(model, **kw)
            mp.apply(model, p, calib, restore=RestoreConfig(sequential=True))
        calls[replay] = [c[0] for c in counts]
        if replay:
            replayed, p_replayed = model, p
        else:
            ordinary = model
    _assert_same_weights(replayed, ordinary)
    rows = {n: r["restore"]["rows"] for n, r in p_replayed.applied["layers"].items()}
    assert set(rows.values()) == {8 * 48 - 18 + 8 * 48}  # real tokens only, both batches
    # replay: the order pass, the check pass, the other batch's capture (layer 0), two runs per batch per block
    assert max(calls[True]) <= 1 + 1 + 1 + 2 * 2
    assert calls[False][0] > calls[True][0] and calls[False][0] >= 2 * len(dense.model.layers)


def test_residual_outside_the_blocks_falls_back_and_matches(monkeypatch) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3)]
            )
            self.head = nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = x + b(x)  # the next block's input is not the tensor the block returned
            return self.head(x)

    torch.manual_seed(1)
    dense = Net().eval()
    calib = [torch.randn(128, 32) for _ in range(2)]
    config = mp.PlanConfig(selection=LayerSelection(exclude_head=False))
    a, _ = _restored(dense, calib, monkeypatch, True, sparsity=0.5, pattern="2:4", budget="uniform", config=config)
    b, _ = _restored(dense, calib, monkeypatch, False, sparsity=0.5, pattern="2:4", budget="uniform", config=config)
    _assert_same_weights(a, b)


def test_chained_blocks_with_a_shared_side_input_replay(monkeypatch) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.relu(self.fc1(x))) * scale

    class Net(nn.Module):
        def __init__(self, per_block_scale: bool) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.per_block_scale = per_block_scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = torch.ones(())
            for i, layer in enumerate(self.layers):
                x = layer(x, scale=s * (i + 1) if self.per_block_scale else s)
            return x

    torch.manual_seed(4)
    calib = [torch.randn(160, 32) for _ in range(2)]
    for per_block in (False, True):  # a side input that changes per block: no replay, result unchanged
        dense = Net(per_block).eval()
        with monkeypatch.context() as m:
            replayed = _spy_replays(m)
            a, _ = _restored(dense, calib, m, True, sparsity=0.5, pattern="2:4", budget="uniform")
        b, _ = _restored(dense, calib, monkeypatch, False, sparsity=0.5, pattern="2:4", budget="uniform")
        _assert_same_weights(a, b)
        assert len(replayed) == (0 if per_block else 3)


def test_a_block_whose_rerun_differs_is_not_replayed(monkeypatch) -> None:
    class Growing(nn.Module):  # like a KV cache the replay does not know: each call sees more state
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x + self.fc(x) * (1.0 + 0.1 * self.calls)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Growing() for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(5)
    calib = [torch.randn(160, 32)]
    replayed = _spy_replays(monkeypatch)
    model = Net().eval()
    p = mp.plan(model, sparsity=0.5, pattern="2:4", budget="uniform")
    mp.apply(model, p, calib, restore=RestoreConfig(sequential=True))
    assert replayed == []  # block 0 re-run on its cached inputs did not reproduce the forward: ordinary path
    assert all("restore" in p.applied["layers"][lp.name] for lp in p.layers)


def test_efficientnet_stages_replay_with_the_same_weights(monkeypatch) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    dense = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    calib = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    replayed = _spy_replays(monkeypatch)
    a, _ = _restored(dense, calib, monkeypatch, True, sparsity=0.5, pattern="2:4")
    assert len(replayed) == len(dense.blocks)  # every stage blocks.N replayed on cached inputs
    b, _ = _restored(dense, calib, monkeypatch, False, sparsity=0.5, pattern="2:4")
    _assert_same_weights(a, b)


def test_caching_the_block_run_holds_a_few_hidden_states_not_one_per_block(monkeypatch) -> None:
    """The replay checks run as the forward goes: an 8-block decoder keeps ≤ 3 (B, T, H) states, not 9."""
    import gc

    import mp_plugin.restore.chain as chain

    torch.manual_seed(0)
    model = decoder("llama", layers=8)
    p = mp.plan(model, sparsity=0.5, pattern="2:4")
    live: list[int] = []
    original = chain.run_stoppable

    def counting(m: nn.Module, data, **kwargs) -> None:
        original(m, data, **kwargs)
        if not live:  # right after the first (checking) forward
            gc.collect()
            live.append(sum(isinstance(o, torch.Tensor) and tuple(o.shape) == (2, 48, 256) for o in gc.get_objects()))

    monkeypatch.setattr(chain, "run_stoppable", counting)
    calib = [{"input_ids": torch.randint(0, 384, (2, 48))} for _ in range(2)]
    mp.apply(model, p, calib, restore=RestoreConfig(sequential=True))
    assert live and live[0] <= 3, live
    assert all(e.get("restore") for e in p.applied["layers"].values())
