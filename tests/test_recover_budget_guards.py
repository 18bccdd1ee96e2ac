"""SER, Hybrid, the data-free shrink, dense classifier training and budget edge cases (an audit's findings)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mp_plugin as mp
from mp_plugin.budget.rules import SEBConfig, SEBRegime
from mp_plugin.errors import ConfigError, MPPluginError
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.planning.build import PlanConfig
from mp_plugin.recover.distill import DistillConfig
from mp_plugin.recover.ser import HybridConfig, SERConfig, SpectralEdgeReallocation, hybrid_magnitude_ser
from mp_plugin.recover.ser.hybrid import magnitude_step

torch.set_num_threads(1)
SELECT = DistillConfig(epochs=1, max_steps=2, lr=1e-2, weight_decay=0.0, allow_dense=True)
TUNE = DistillConfig(epochs=1, max_steps=2, lr=1e-2, weight_decay=0.0)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _loader(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _zeros(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_hybrid_keeps_one_layer_set_for_magnitude_and_ser_steps() -> None:
    model = _Net()
    heads: list[int] = []
    cfg = HybridConfig(
        schedule=(0.1, 0.2, 0.3), selection=LayerSelection(exclude_head=False), finetune=TUNE,
        ser=SERConfig(selection=SELECT, finetune=TUNE),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = hybrid_magnitude_ser(
            model,
            _loader(),
            copy.deepcopy(model),
            cfg,
            on_step=lambda r, m: heads.append(int((m.head.weight == 0).sum())),
        )
    assert set(res.masks) == {"fc1", "fc2", "head"}  # the SER step prunes the head the magnitude steps pruned
    assert heads == sorted(heads) and heads[-1] == int((~res.masks["head"]).sum())  # cumulative: nothing grows back


def test_a_failed_ser_step_leaves_the_model_as_it_was() -> None:
    model = _mlp()
    magnitude_step(model, 0.52)
    before = copy.deepcopy(model.state_dict())
    ser = SpectralEdgeReallocation(SERConfig(selection=SELECT, finetune=None))
    with pytest.raises(MPPluginError, match="already sparser"):
        ser.run(model, 0.5, _loader())
    with pytest.raises(MPPluginError, match="empty"):
        ser.run(model, 0.6, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs", [{"extra": "0.03"}, {"logit_l2_weight": float("nan")}, {"logit_l2_weight": -1.0}, {"selection": None}]
)
def test_ser_config_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SERConfig(**kwargs)


def test_ser_restoring_dense_values_from_all_pruned_entries_keeps_no_kept_zero() -> None:
    model = _mlp()
    magnitude_step(model, 0.45)
    teacher = copy.deepcopy(model).train()
    teacher[0].eval()  # mixed flags come back as they were
    cfg = SERConfig(reservoir="all", restore_value="dense", selection=SELECT, finetune=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = SpectralEdgeReallocation(cfg).run(model, 0.5, _loader(), teacher=teacher)
    modules = dict(model.named_modules())
    for name, mask in res.masks.items():  # every entry the mask keeps is nonzero: masks and zeros agree
        assert torch.equal(modules[name].weight != 0, mask), name
    assert teacher.training and not teacher[0].training


def test_regulariser_shrink_validates_and_gives_back_requires_grad_after_an_error() -> None:
    from mp_plugin.recover.training_mp import regulariser_shrink

    model = _mlp()
    model[0].weight.requires_grad_(False)
    for bad in ({"lr": float("nan")}, {"mu_scale": float("nan")}, {"l1": -1.0}, {"lr": 0.0}):
        with pytest.raises(MPPluginError):
            regulariser_shrink(model, steps=2, **bad)
        assert not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_dense_classifier_training_does_not_hold_exact_zeros() -> None:
    from mp_plugin.evaluation.classifier_training import TrainConfig, train_classifier

    torch.manual_seed(0)
    x = torch.randn(128, 16)
    y = (x[:, 0] > 0).long()
    model = _mlp()
    with torch.no_grad():
        model[4].weight.zero_()  # a zero-initialised head must train
    train_classifier(model, x, y, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, seed=0))
    assert int((model[4].weight != 0).sum()) > 0


@pytest.mark.parametrize("rule", ["mp-bulk", "mp"])
def test_dense_24_mix_leaves_a_layer_that_cannot_take_24_dense(rule: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cfg = PlanConfig(auto_patterns=("dense", "2:4"), mix_rule=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = mp.plan(model, 0.3, "auto", config=cfg)
    patterns = {lp.name: lp.pattern for lp in p.layers}
    assert patterns["0"] == "dense" and "2:4" in patterns.values()


def test_seb_reads_its_signal_from_the_config() -> None:
    model = _mlp()
    sel = LayerSelection(exclude_head=False)
    hill = mp.plan(model, 0.5, "unstructured", "seb", PlanConfig(selection=sel, seb=SEBConfig(signal="hill_alpha")))
    ref = mp.plan(model, 0.5, "unstructured", "seb-hill", PlanConfig(selection=sel))
    sigma = mp.plan(model, 0.5, "unstructured", "seb", PlanConfig(selection=sel))
    assert [lp.n_prune for lp in hill.layers] == [lp.n_prune for lp in ref.layers]
    assert [lp.n_prune for lp in hill.layers] != [lp.n_prune for lp in sigma.layers]
    with pytest.raises(ConfigError, match="signal"):
        SEBConfig(signal="hill")


@pytest.mark.parametrize(
    "make",
    [
        lambda: SEBRegime(0.3, 0.4, beta=1.0, s_d=0.0),
        lambda: SEBRegime(0.5, 0.4, beta=1.0, s_d=0.5),
        lambda: SEBRegime(0.3, 0.4, beta=float("nan"), s_d=0.5),
        lambda: SEBConfig(regimes=(SEBRegime(0.5, 0.6, 1.0, 0.7), SEBRegime(0.3, 0.4, 1.0, 0.5))),
    ],
)
def test_seb_regime_rows_are_validated(make) -> None:
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize("s", [0.01, 0.05, 0.2])
def test_noise_floor_reaches_small_targets_when_a_layer_is_all_zero(s: float) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16))
    with torch.no_grad():
        model[1].weight.zero_()
    cal = [torch.randn(16, 32) for _ in range(2)]
    cfg = PlanConfig(selection=LayerSelection(exclude_head=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = mp.plan(model, s, "unstructured", "noise-floor", cfg, calibration=cal)
    assert sum(lp.n_prune for lp in p.layers) == int(s * sum(m.weight.numel() for m in model))


@pytest.mark.parametrize("kwargs", [{"every": 1.5}, {"every": 0}, {"min_rank": -3}, {"min_rank": 0}])
def test_mp_singular_value_pruning_refuses_bad_periods_and_ranks(kwargs: dict) -> None:
    from mp_plugin.recover.training_mp import MPSingularValuePruning

    with pytest.raises(MPPluginError):
        MPSingularValuePruning(**kwargs)


def test_prune_target_is_the_floor_at_any_size_and_never_everything() -> None:
    from mp_plugin.masks.counts import global_prune_counts, prune_target

    assert prune_target(0.7, 1_000_000_001) == 700_000_000
    assert prune_target(0.3, 10) == 3 and prune_target(0.5, 7) == 3
    assert prune_target(0.9999999999, 10) == 9 and prune_target(0.999999999, 7) == 6
    assert global_prune_counts([torch.randn(10)], [1.0], 0.9999999999) == [9]


def test_unstructured_mask_refuses_nan_scores() -> None:
    from mp_plugin.errors import InvalidWeightError
    from mp_plugin.masks.select import unstructured_mask

    with pytest.raises(InvalidWeightError):
        unstructured_mask(torch.tensor([1.0, 2.0, float("nan"), 3.0, 4.0]), 2)


def test_cast_refuses_a_non_finite_covariance() -> None:
    from mp_plugin.errors import CalibrationError
    from mp_plugin.layers.calibration import GroupCovariance
    from mp_plugin.masks.cast import cast_project

    cov = torch.eye(4, dtype=torch.float64)[None].clone()
    cov[0, 3, 3] = float("inf")
    stats = GroupCovariance(cov=cov, n=4, rows=8)
    with pytest.raises(CalibrationError):
        cast_project(torch.tensor([[4.0, 3.0, 0.2, 0.1]]), stats, 2, 4)


def test_layer_selection_heads_shared_weights_and_bad_rules() -> None:
    from mp_plugin.layers.discovery import find_target_layers

    head_in_seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    model = nn.Module()
    model.features, model.classifier = head_in_seq, nn.Sequential(nn.Dropout(), nn.Linear(16, 4))
    targets, skipped = find_target_layers(model)
    assert [t.name for t in targets] == ["features.0"]  # "classifier.1" is the head (torchvision style)
    assert ("classifier.1", "classifier head") in [(s.name, s.reason) for s in skipped]
    tied = nn.Module()
    tied.body, tied.mid, tied.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
    tied.head.weight = tied.body.weight  # the head is left out, so its alias is too
    targets, _ = find_target_layers(tied)
    assert [t.name for t in targets] == ["mid"]
    for bad in ({"exclude": "attn"}, {"exclude": ["("]}, {"min_dim": "2"}, {"include_only": None}):
        with pytest.raises(ConfigError):
            LayerSelection(**bad)
    with pytest.raises(ConfigError):
        find_target_layers(None)
    with pytest.raises(ConfigError):
        mp.sparsity_report(None)


def test_hessian_selection_with_a_transposed_weight_restores_without_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    model[2].weight = nn.Parameter(torch.randn(64, 64).t().contiguous().t())  # column-major storage
    sel = PlanConfig(selection=LayerSelection(exclude_head=False))
    p = mp.plan(model, 0.5, "unstructured", "magnitude", sel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.apply(model, p, calibration=torch.randn(256, 64), restore=True)
    assert sum(int((model[i].weight == 0).sum()) for i in (0, 2, 4)) == sum(lp.n_prune for lp in p.layers)


def test_restore_names_the_calibration_batch_that_fails() -> None:
    from mp_plugin.errors import CalibrationError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    p = mp.plan(model, 0.5, "unstructured", "magnitude", PlanConfig(selection=LayerSelection(exclude_head=False)))
    with pytest.raises(CalibrationError, match="calibration batch 1 "):
        mp.apply(model, p, calibration=[torch.randn(64, 32), torch.randn(8, 31)], restore=True)


def test_sequential_restore_names_the_calibration_batch_that_fails() -> None:
    """The block replay runs batches 1… on their own: the message still names the batch by its index."""
    from mp_plugin.errors import CalibrationError
    from mp_plugin.restore import RestoreConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    p = mp.plan(model, 0.5, "unstructured", "magnitude", PlanConfig(selection=LayerSelection(exclude_head=False)))
    calibration = [torch.randn(64, 32), torch.randn(64, 32), torch.randn(8, 31)]
    with pytest.raises(CalibrationError, match="calibration batch 2 "):
        mp.apply(model, p, calibration=calibration, restore=RestoreConfig(sequential=True))
