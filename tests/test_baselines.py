"""Baseline pruners (mp_plugin.evaluation.baselines) and the evaluation helpers the accuracy benchmark relies on.

A broken baseline or a broken metric would quietly make MP look good, so each is
checked against an independent expectation on tiny models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_mlp
from torch import nn

from mp_plugin.evaluation.baselines import (
    BASELINES,
    BaselineNotApplicable,
    SparseGPTReport,
    prune_baseline,
)
from mp_plugin.evaluation.metrics import embedding_retention, linear_probe_accuracy, output_fidelity
from mp_plugin.masks.scores import input_norms
from mp_plugin.masks.select import check_nm, nm_mask
from mp_plugin.planning.build import plan
from mp_plugin.pruning.apply_plan import sparsity_report


def _skewed_inputs(n: int = 512, d: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, d) inputs whose column scales span 0.05 … 4 (correlated through a random mixing)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix) * torch.logspace(-1.3, 0.6, d)


def _single(d_in: int = 32, d_out: int = 16, seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
    return nn.Sequential(lin)


def _run(
    name: str, model: nn.Module, sparsity: float, pattern: str, x: torch.Tensor, report: SparseGPTReport | None = None
) -> nn.Module:
    return prune_baseline(name, model, sparsity, pattern, [x[: len(x) // 2], x[len(x) // 2 :]], report=report)


UNSTRUCTURED = ["uniform-magnitude", "global-magnitude", "wanda", "torchao-wanda"]


@pytest.mark.parametrize("name", UNSTRUCTURED)
@pytest.mark.parametrize("sparsity", [0.5, 0.625])
def test_unstructured_baselines_hit_the_requested_sparsity_exactly(name: str, sparsity: float) -> None:
    model = make_mlp((32, 64, 64, 16))
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    _run(name, model, sparsity, "unstructured", _skewed_inputs())
    report = sparsity_report(model)
    assert report.total_zeros == round(sparsity * total)
    if name != "global-magnitude":  # per-layer methods: every layer at s
        assert all(abs(layer.sparsity - sparsity) < 1e-9 for layer in report.layers)


@pytest.mark.parametrize("name", ["uniform-magnitude", "global-magnitude", "wanda", "torchao-wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_kn_baselines_give_exact_patterns(name: str, pattern: str) -> None:
    k, n = (int(v) for v in pattern.split(":"))
    model = make_mlp((32, 64, 64, 16))
    if name == "sparsegpt" and pattern != "2:4":
        with pytest.raises(BaselineNotApplicable):
            _run(name, model, 0.5, pattern, _skewed_inputs())
        return
    _run(name, model, 0.5, pattern, _skewed_inputs())
    for m in model:
        if isinstance(m, nn.Linear):
            groups = (m.weight.reshape(m.weight.shape[0], -1, n) != 0).sum(-1)
            assert bool((groups == k).all()), f"{name}: not exactly {pattern}"
    assert type(model[0]) is nn.Linear and not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_input_norms_match_direct_computation() -> None:
    model = _single()
    x = _skewed_inputs()
    norms = input_norms(model, ["0"], [x[:100], x[100:]])["0"]
    torch.testing.assert_close(norms, x.double().norm(dim=0))


def test_wanda_equals_per_row_magnitude_when_input_norms_are_equal() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (256, 32), generator=g).float() * 2 - 1  # ±1: every column norm is exactly 16
    for pattern in ("unstructured", "2:4"):
        model = _single()
        w = model[0].weight.detach().clone()
        _run("wanda", model, 0.5, pattern, x)
        if pattern == "2:4":
            expected = nm_mask(w, 2, 4)
        else:
            order = w.abs().argsort(dim=1)
            expected = torch.ones_like(w, dtype=torch.bool)
            expected.scatter_(1, order[:, :16], False)
        assert torch.equal(model[0].weight != 0, expected)


def test_wanda_differs_from_magnitude_when_input_norms_are_skewed() -> None:
    x = _skewed_inputs()
    for pattern in ("unstructured", "2:4"):
        wanda, mag = _single(), _single()
        _run("wanda", wanda, 0.5, pattern, x)
        _run("uniform-magnitude", mag, 0.5, pattern, x)
        differ = (wanda[0].weight != 0) != (mag[0].weight != 0)
        assert int(differ.sum()) > 0.05 * differ.numel()
        # Wanda's pruned entries sit on lower-norm inputs than magnitude's
        norms = x.norm(dim=0)
        pruned_norm_wanda = float(((wanda[0].weight == 0).float() @ norms).sum())
        pruned_norm_mag = float(((mag[0].weight == 0).float() @ norms).sum())
        assert pruned_norm_wanda < (0.9 if pattern == "unstructured" else 0.99) * pruned_norm_mag


def _reconstruction_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).pow(2).sum())


def test_sparsegpt_modelopt_beats_magnitude_reconstruction_on_calibration_data() -> None:
    x = _skewed_inputs(seed=3)
    dense = _single(32, 32, seed=3)
    sgpt, mag = copy.deepcopy(dense), copy.deepcopy(dense)
    _run("sparsegpt", sgpt, 0.5, "2:4", x)
    _run("uniform-magnitude", mag, 0.5, "2:4", x)
    assert check_nm(sgpt[0].weight, 2, 4)
    e_sgpt, e_mag = _reconstruction_error(sgpt, dense, x), _reconstruction_error(mag, dense, x)
    # ModelOpt keeps the original values of the kept weights (mask selection only), so the gain is modest
    assert e_sgpt < 0.98 * e_mag, (e_sgpt, e_mag)


class _SamePadConv(nn.Conv2d):
    """A conv that pads in ``forward`` (TF "same"), like EfficientNet's ``Conv2dStaticSamePadding``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        return nn.functional.conv2d(
            nn.functional.pad(x, [(k - 1) // 2, k // 2] * 2), self.weight, self.bias, self.stride, 0, self.dilation
        )


def test_sparsegpt_registers_conv_subclasses_only_where_modelopt_hessian_is_exact() -> None:
    from modelopt.torch.sparsity.weight_sparsity.module import SpDMRegistry

    torch.manual_seed(0)
    model = nn.Sequential(
        _SamePadConv(8, 16, 1),
        nn.ReLU(),
        _SamePadConv(16, 16, 3),
        nn.ReLU(),
        _SamePadConv(16, 32, 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
    )
    dense = copy.deepcopy(model)
    x = torch.randn(4, 8, 12, 12) * torch.logspace(-1, 0.5, 8)[None, :, None, None]
    report = SparseGPTReport()
    with pytest.warns(UserWarning, match="2 of 4 2:4 targets fell back"):
        _run("sparsegpt", model, 0.5, "2:4", x, report)
    assert report.modelopt == ["0", "4"]
    assert not [k for k in vars(model) if k.startswith("mp_")]  # nothing attached to the model
    # the 3×3 subclass pads inside forward: the hook input is not what it convolves
    assert sorted(report.fallback) == ["2", "6"] and "pads" in report.fallback["2"]
    # the plain 3×3 conv is ModelOpt's own, but its mask groups the flattened C_in·kh·kw row
    assert "not 2:4 along input channels" in report.fallback["6"]
    assert len(report.registered) == 1 and "_SamePadConv" in report.registered[0]
    for i in (0, 2, 4):
        w, d = model[i].weight, dense[i].weight
        assert type(model[i]) is _SamePadConv and check_nm(w, 2, 4)
        assert torch.equal(w[w != 0], d[w != 0])  # ModelOpt selects a mask, it does not update kept weights
    for i in (2, 6):
        assert torch.equal(model[i].weight, dense[i].weight * nm_mask(dense[i].weight, 2, 4))
    assert type(model[6]) is nn.Conv2d
    assert model[0] not in SpDMRegistry  # registration undone


def test_sparsegpt_is_real_on_pretrained_efficientnet_lite0(efficientnet_lite0) -> None:
    from mp_plugin.evaluation.photos import real_photo_crops

    x = real_photo_crops(4, 224, seed=2)
    sgpt, mag = efficientnet_lite0, copy.deepcopy(efficientnet_lite0)
    dense = {n: p.detach().clone() for n, p in sgpt.named_parameters()}
    targets = [lp.name for lp in plan(sgpt, 0.5, "2:4", "uniform").layers if lp.pattern == "2:4"]
    assert len(targets) >= 30
    report = SparseGPTReport()
    prune_baseline("sparsegpt", sgpt, 0.5, "2:4", x, report=report)
    prune_baseline("uniform-magnitude", mag, 0.5, "2:4", x, report=SparseGPTReport())  # nothing to report: ignored
    assert report.fallback == {} and report.modelopt == targets
    ms, mm = dict(sgpt.named_modules()), dict(mag.named_modules())
    differing = 0
    for name in targets:
        w = ms[name].weight
        assert type(ms[name]).__name__ == "Conv2dStaticSamePadding" and not ms[name]._forward_hooks
        # at most 2 of every 4 input channels kept; a few more zeros where the dense weight is already 0 or
        # (SparseGPT's own rule) the input channel is dead on the calibration crops
        assert check_nm(w, 2, 4) and int((w == 0).sum()) >= w.numel() // 2
        differing += float(((w != 0) != (mm[name].weight != 0)).float().mean()) > 0.02
    # a broken baseline that silently degenerates to magnitude 2:4 would differ nowhere
    assert differing >= 0.9 * len(targets), (differing, len(targets))
    for name, p in sgpt.named_parameters():  # non-targets untouched, kept target weights unchanged
        kept = p != 0
        assert torch.equal(p[kept], dense[name][kept]), name
        if name.removesuffix(".weight") not in targets:
            assert torch.equal(p, dense[name]), name


def test_torchao_wanda_prunes_low_norm_inputs_more_than_magnitude() -> None:
    x = _skewed_inputs()
    ao, mag = _single(), _single()
    _run("torchao-wanda", ao, 0.5, "unstructured", x)
    _run("uniform-magnitude", mag, 0.5, "unstructured", x)
    assert int((ao[0].weight == 0).sum()) == 256
    assert int((ao[0].weight[:, :8] == 0).sum()) > int((mag[0].weight[:, :8] == 0).sum())


def test_torchao_wanda_refuses_conv_targets_and_baselines_need_calibration() -> None:
    conv = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with pytest.raises(BaselineNotApplicable):
        prune_baseline("torchao-wanda", conv, 0.5, "unstructured", torch.randn(2, 8, 12, 12))
    with pytest.raises(Exception, match="calibration"):
        prune_baseline("wanda", make_mlp(), 0.5, "unstructured", None)
    assert set(UNSTRUCTURED) | {"sparsegpt"} <= set(BASELINES)


def test_wanda_on_conv_uses_unfolded_input_norms() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(4, 8, 10, 10) * torch.logspace(-1, 0.5, 8)[None, :, None, None]
    _run("wanda", conv, 0.5, "2:4", x)
    assert check_nm(conv[0].weight, 2, 4) and check_nm(conv[2].weight, 2, 4)
    # the stem rule excludes C_in ≤ 3 only, so both convs are targets
    assert sparsity_report(conv).total_sparsity == pytest.approx(0.5)


# --------------------------------------------------------------------------- evaluation helpers


def test_linear_probe_learns_a_separable_problem_and_not_random_labels() -> None:
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.arange(400) % 5
    feats = centers[y] + torch.randn(400, 16, generator=g)
    acc = linear_probe_accuracy(feats[:300], y[:300], feats[300:], y[300:])
    assert acc > 0.95
    y_rand = torch.randint(0, 5, (400,), generator=g)
    noise = torch.randn(400, 16, generator=g)
    assert linear_probe_accuracy(noise[:300], y_rand[:300], noise[300:], y_rand[300:]) < 0.45


def test_fidelity_of_identical_outputs_is_perfect_and_of_different_outputs_is_not() -> None:
    logits = torch.randn(64, 10)
    same = output_fidelity(logits, logits.clone())
    assert same.top1_agreement == 1.0 and same.cosine == pytest.approx(1.0) and abs(same.kl) < 1e-6
    other = output_fidelity(logits, torch.randn(64, 10))
    assert other.top1_agreement < 0.5 and other.cosine < 0.5 and other.kl > 0.1
    ret = embedding_retention(logits, logits.clone())
    assert ret["cosine"] == pytest.approx(1.0) and ret["neighbour_agreement"] == 1.0


class _TokenNet(nn.Module):
    """Embedding → Linear(32→16) → Linear(16→8), called as model(input_ids=…, attention_mask=…); the
    padding id 0 embeds to a huge vector, so a framework that counted padding positions would pick other masks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        g = torch.Generator().manual_seed(3)
        self.emb = nn.Embedding(20, 32)
        self.fc = nn.Linear(32, 16)
        self.out = nn.Linear(16, 8)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(20, 32, generator=g) * torch.logspace(-1, 0.5, 32))
            self.emb.weight[0] = 40.0 * torch.randn(32, generator=g).abs()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(input_ids)))).mean(1)


def _token_batches() -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(4)
    lengths = [12, 5, 9, 3]
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 20, (n,), generator=g)
        mask[i, :n] = 1
    padded = {"input_ids": ids, "attention_mask": mask}
    plain = [{"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]} for i, n in enumerate(lengths)]
    return padded, plain


def test_unpadded_samples_cuts_right_padding_and_keeps_other_data() -> None:
    from mp_plugin.evaluation.baselines import unpadded_samples

    padded, plain = _token_batches()
    out = unpadded_samples([padded])
    assert len(out) == 4
    for got, want in zip(out, plain):
        assert all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(3, 5)
    assert unpadded_samples(x) is x and unpadded_samples([x])[0] is x
    left = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1]])}
    assert unpadded_samples(left)["input_ids"].shape == (1, 4)  # left padding: kept whole
    as_numpy = {k: v.numpy() for k, v in padded.items()}  # numpy token batches are cut the same way
    for got, want in zip(unpadded_samples([as_numpy]), plain):
        assert all((got[k] == want[k].numpy()).all() and got[k].shape == tuple(want[k].shape) for k in want)
    empty = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [0, 0, 0]])}
    assert len(unpadded_samples([empty])) == 1  # an all-padding sample is dropped


@pytest.mark.parametrize("name,pattern", [("torchao-wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_framework_baselines_do_not_count_padding_tokens(name: str, pattern: str) -> None:
    """ModelOpt's and torchao's hooks see every position; the baseline feeds them real tokens only."""
    padded, plain = _token_batches()
    a, b = _TokenNet(), _TokenNet()
    prune_baseline(name, a, 0.5, pattern, [padded])
    prune_baseline(name, b, 0.5, pattern, plain)
    for la, lb in ((a.fc, b.fc), (a.out, b.out)):
        assert torch.equal(la.weight == 0, lb.weight == 0)
