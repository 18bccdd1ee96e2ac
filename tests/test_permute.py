"""Channel permutation for k:n: searches, coupling discovery, folding into weights, bad input."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from conftest import make_mlp
from torch import nn

import mp_plugin
from mp_plugin.errors import PatternError
from mp_plugin.masks.select import nm_mask
from mp_plugin.permute import (
    find_couplings,
    interleave_permutation,
    kept_magnitude,
    permute_channels,
    swap_permutation,
)
from mp_plugin.permute.fold import consumer_matrix


def _heavy(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp_min(0.05).sqrt()


def _swapped(p: torch.Tensor, i: int, j: int) -> torch.Tensor:
    q = p.clone()
    q[i], q[j] = p[j], p[i]
    return q


# ---------------------------------------------------------------------------------------------
# searches on one matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_swap_search_is_a_local_optimum_of_the_exact_objective(k: int, n: int) -> None:
    w = _heavy(24, 4 * n, seed=k + n)
    perm = swap_permutation(w, k, n, init="identity")
    assert sorted(perm.tolist()) == list(range(w.shape[1]))
    found = kept_magnitude(w, k, n, perm)
    assert found > kept_magnitude(w, k, n)
    best_neighbour = max(
        kept_magnitude(w, k, n, _swapped(perm, i, j))
        for i, j in itertools.combinations(range(w.shape[1]), 2)
        if i // n != j // n
    )
    # no single swap improves beyond the float32 scoring tolerance of the search
    assert best_neighbour <= found * (1 + 1e-5)


def test_swap_search_on_a_3x3_conv_improves_its_own_kn_mask() -> None:
    conv = torch.nn.Conv2d(24, 32, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_heavy(32, 24 * 9, seed=3).reshape(32, 24, 3, 3))
    mat = consumer_matrix(conv)  # (C_out·kh·kw, C_in): one row per output channel and kernel position
    assert mat.shape == (32 * 9, 24)
    perm = swap_permutation(mat, 2, 4)
    assert sorted(perm.tolist()) == list(range(24))
    # the gain is real on the conv's own k:n mask (groups along input channels at each position)
    w = conv.weight.detach()
    before = float((w.abs() * nm_mask(w, 2, 4)).sum())
    wp = w[:, perm]
    after = float((wp.abs() * nm_mask(wp, 2, 4)).sum())
    assert after > before
    assert abs(after - kept_magnitude(mat, 2, 4, perm)) < 1e-3 * after


def test_interleave_puts_one_channel_of_each_stratum_in_every_group() -> None:
    w = _heavy(16, 32, seed=5)
    perm = interleave_permutation(w, 4)
    imp = w.pow(2).sum(0)
    rank = torch.empty(32, dtype=torch.long)
    rank[torch.argsort(imp, descending=True)] = torch.arange(32)
    stratum = rank[perm] // 8  # 4 strata of 8
    assert (stratum.reshape(8, 4) == torch.arange(4)).all()


def test_search_rejects_bad_shapes_and_patterns() -> None:
    w = torch.randn(8, 10)
    with pytest.raises(PatternError, match="divisible"):
        swap_permutation(w, 2, 4)
    with pytest.raises(PatternError):
        swap_permutation(torch.randn(8, 16), 4, 4)
    with pytest.raises(PatternError):
        kept_magnitude(torch.randn(8, 34), 2, 17)
    with pytest.raises(PatternError):
        swap_permutation(torch.randn(8, 4, 4), 2, 4)


# ---------------------------------------------------------------------------------------------
# folding into models
# ---------------------------------------------------------------------------------------------


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._state_dict_hooks or m._load_state_dict_pre_hooks)
        for m in model.modules()
    )


def _roundtrip(model: nn.Module, fresh: nn.Module, x: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    sd, sd2 = model.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[key], sd2[key]) for key in sd)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_mlp_permutation_is_folded_and_recorded() -> None:
    model = make_mlp((32, 64, 64, 16)).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 32)
    with torch.no_grad():
        y0 = model(x)
    keys = set(model.state_dict())
    rec = permute_channels(model, "2:4", example_input=x)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
    assert set(model.state_dict()) == keys and _no_hooks(model)
    perms = rec.permutations
    assert set(perms) == {"2", "4"}
    p2, p4 = torch.tensor(perms["2"]), torch.tensor(perms["4"])
    assert torch.equal(model[4].weight, original["4.weight"][:, p4])
    assert torch.equal(model[2].weight, original["2.weight"][p4][:, p2])  # rows for layer 4, columns for itself
    assert torch.equal(model[2].bias, original["2.bias"][p4])
    assert torch.equal(model[0].weight, original["0.weight"][p2])
    report = rec.report
    assert all(r.kept_after > r.kept_before for r in report.permuted)
    assert "0" in {s.name for s in report.skipped}  # its input is the model input


class _ScaledMLP(nn.Module):
    """Linear → per-channel scale (LayerScale-style parameter) → GELU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.gamma = nn.Parameter(torch.rand(32) + 0.5)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x) * self.gamma))


def test_batchnorm_stats_depthwise_and_scale_parameters_move_with_the_channels() -> None:
    torch.manual_seed(0)
    convs = nn.Sequential(
        nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.Hardswish(),
        nn.Conv2d(32, 8, 1),
    ).eval()  # fmt: skip
    for bn in (convs[1], convs[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    mean0 = convs[1].running_mean.clone()
    records = []
    for model, x in ((convs, torch.randn(2, 8, 6, 6)), (_ScaledMLP().eval(), torch.randn(4, 16))):
        with torch.no_grad():
            y0 = model(x)
        rec = permute_channels(model, "2:4", example_input=x)
        records.append(rec)
        with torch.no_grad():
            assert (model(x) - y0).abs().max() <= 1e-5
        assert len(rec.report.permuted) == 1, str(rec.report)
    perm = torch.tensor(records[0].permutations["6"])
    assert torch.equal(convs[1].running_mean, mean0[perm])


ARCHS = {
    # name: (input size, create kwargs, minimum number of permuted layers, method)
    "vit_tiny_patch16_224": (64, {"img_size": 64}, 20, "swap"),
    "deit_tiny_patch16_224": (64, {"img_size": 64}, 20, "swap"),
    "swin_tiny_patch4_window7_224": (224, {}, 20, "swap"),
    "convnext_atto": (64, {}, 12, "swap"),
    "resnet18": (64, {}, 7, "swap"),  # 8 couplings; with 0.1 s per layer one 3×3 search may keep identity
    "efficientnet_b0": (64, {}, 20, "swap"),
    "mobilenetv3_small_100": (64, {}, 15, "swap"),
    "mixer_s16_224": (64, {"img_size": 64}, 12, "swap"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_timm_function_preserved_and_state_dict_round_trips(arch: str) -> None:
    timm = pytest.importorskip("timm")
    size, kwargs, min_permuted, method = ARCHS[arch]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y0 = model(x)
    keys = list(model.state_dict())
    rec = permute_channels(model, "2:4", method=method, example_input=x, max_seconds_per_layer=0.1)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
    report = rec.report
    assert report.verified is True
    assert len(report.permuted) >= min_permuted, str(report)
    assert all(r.kept_after >= r.kept_before for r in report.permuted)
    assert list(model.state_dict()) == keys and _no_hooks(model)
    torch.manual_seed(1)  # a differently initialised fresh instance
    _roundtrip(model, timm.create_model(arch, pretrained=False, **kwargs).eval(), x)


def test_vit_attention_permutes_only_value_rows_within_heads() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    qkv0 = model.blocks[0].attn.qkv.weight.detach().clone()
    rec = permute_channels(
        model, "2:4", method="swap", example_input=torch.randn(1, 3, 32, 32), max_seconds_per_layer=0.1
    )
    perm = torch.tensor(rec.permutations["blocks.0.attn.proj"])
    c, d = 192, 64
    assert torch.equal(perm // d, torch.arange(c) // d) and not torch.equal(perm, torch.arange(c))
    qkv = model.blocks[0].attn.qkv.weight
    assert torch.equal(qkv[: 2 * c], qkv0[: 2 * c])
    assert torch.equal(qkv[2 * c :], qkv0[2 * c :][perm])


def test_attention_without_example_input_is_skipped_and_reported() -> None:
    model = _TinyAttnBlock().eval()
    rec = permute_channels(model, "2:4", method="interleave")
    skipped = {s.name: s.reason for s in rec.report.skipped}
    assert "verified" in skipped["proj"]


def test_real_efficientnet_lite0_permutation(efficientnet_lite0: nn.Module) -> None:
    import copy

    model = copy.deepcopy(efficientnet_lite0)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        y0 = model(x)
    rec = permute_channels(model, "2:4", method="swap", example_input=x, max_seconds_per_layer=0.3)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
    report = rec.report
    assert len(report.permuted) >= 15, str(report)
    assert all(r.kept_after > r.kept_before for r in report.permuted)
    skipped = {s.name: s.reason for s in report.skipped}
    assert any("residual" in r for r in skipped.values())
    _roundtrip(model, copy.deepcopy(efficientnet_lite0), x)


def test_swap_beats_none_and_interleave_on_real_layers(efficientnet_lite0: nn.Module, minilm: nn.Module) -> None:
    eff = [m.weight.detach().flatten(1) for m in efficientnet_lite0.modules()
           if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.in_channels % 8 == 0]  # fmt: skip
    lin = [m.weight.detach() for m in minilm.modules() if isinstance(m, nn.Linear) and m.in_features % 8 == 0]
    mats = eff[1:12:2] + lin[:1] + lin[4:6]
    for k, n in ((2, 4), (4, 8)):
        strictly_better = 0
        for w in mats:
            none = kept_magnitude(w, k, n)
            inter = kept_magnitude(w, k, n, interleave_permutation(w, n))
            swap = kept_magnitude(w, k, n, swap_permutation(w, k, n, max_seconds=1.0))
            assert swap >= none and swap >= inter
            strictly_better += swap > max(none, inter) * (1 + 1e-4)
        assert strictly_better >= len(mats) - 1


# ---------------------------------------------------------------------------------------------
# unknown modules and bad input
# ---------------------------------------------------------------------------------------------


class _Roll(nn.Module):
    """Mixes channels: a permutation cannot pass it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=-1)


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, its children can."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp((16, 32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) if x.sum() > -1e9 else x


class _TinyAttnBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


def test_unknown_module_is_skipped_and_reported() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _Roll(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        y0 = model(x)
    rec = permute_channels(model, "2:4", example_input=x)
    with torch.no_grad():
        assert torch.allclose(model(x), y0, atol=1e-6)
    report = rec.report
    skipped = {s.name: s.reason for s in report.skipped}
    assert "roll" in skipped["3"]
    assert [p.name for p in report.permuted] == ["5"]


def test_untraceable_parent_falls_back_to_children() -> None:
    model = _Untraceable().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y0 = model(x)
    couplings, _, notes = find_couplings(model)
    assert notes and [c.consumers for c in couplings] == [["mlp.2"]]
    rec = permute_channels(model, "2:4", example_input=x)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
    assert "mlp.2" in rec.permutations


def test_shared_weights_and_grouped_convs_are_skipped() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 32)
            self.b = nn.Linear(32, 32)
            self.c = nn.Linear(32, 32)
            self.c.weight = self.b.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    model = Tied().eval()
    rec = permute_channels(model, "2:4", example_input=torch.randn(2, 16))
    skipped = {s.name: s.reason for s in rec.report.skipped}
    assert "shared" in skipped["b"]
    assert not rec.permutations

    conv = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=2), nn.Conv2d(16, 8, 1)).eval()
    rec = permute_channels(conv, "2:4", example_input=torch.randn(1, 8, 8, 8))
    reasons = " ".join(s.reason for s in rec.report.skipped)
    assert "grouped" in reasons


def test_bad_patterns_and_methods() -> None:
    model = make_mlp((32, 64, 10))
    with pytest.raises(PatternError):
        permute_channels(model, "4:17")
    with pytest.raises(PatternError):
        permute_channels(model, "4:4")
    with pytest.raises(PatternError):
        permute_channels(model, "dense")
    with pytest.raises(ValueError, match="method"):
        permute_channels(model, "2:4", method="random")
    with pytest.raises(ValueError, match="example_input"):
        permute_channels(model, "2:4", method="interleave", importance="activation")
    rec = permute_channels(model, "2:6", example_input=torch.randn(2, 32))  # 64 inputs are not divisible by 6
    reasons = {s.name: s.reason for s in rec.report.skipped}
    assert "divisible" in reasons["2"]


def test_lazy_export_and_activation_importance() -> None:
    model = make_mlp((32, 64, 64, 16)).eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        y0 = model(x)
    rec = mp_plugin.permute_channels(model, "4:8", method="interleave", example_input=x, importance="activation")
    assert isinstance(rec, mp_plugin.permute.PermutationRecord) and rec.permutations
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
    assert rec.report.method == "interleave"


class _FlippedLinear(nn.Linear):
    """A Linear subclass that reverses its input first: its columns are not its input channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.flip(x, [-1]), self.weight, self.bias)


def test_a_layer_subclass_whose_columns_are_not_its_inputs_is_refused_up_front() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _FlippedLinear(32, 8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = permute_channels(model, "2:4")  # no example: nothing would catch a wrong fold afterwards
    reasons = {s.name: s.reason for s in rec.report.skipped}
    assert "_FlippedLinear" in reasons["2"] and "random copy" in reasons["2"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_misread_coupling_is_undone_by_its_consumer_check_and_a_wrong_output_restores_everything(
    monkeypatch,
) -> None:
    """Defence in depth: with the up-front probe switched off, the run-time checks still catch the wrong fold."""
    import mp_plugin.permute.ops as ops

    monkeypatch.setattr(ops, "_plain_layer", lambda module: isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)))

    class Scaled(nn.Module):  # the misread branch reaches the output only through a 1e-6 layer scale
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.flip = nn.Linear(16, 32), _FlippedLinear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1e-6 * self.flip(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = permute_channels(model, "2:4", example_input=x)
    reasons = {s.name: s.reason for s in rec.report.skipped}
    assert "misread" in reasons["flip"] and not rec.report.permuted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # without the consumer outputs (too large to keep) the model output check still refuses a visible change
    monkeypatch.setattr(mp_plugin.permute.verify, "CAPTURE_BYTES", 0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _FlippedLinear(32, 8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp_plugin.permute.PermutationError, match="undone"):
        permute_channels(model, "2:4", example_input=torch.randn(4, 16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Up(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fc(x))


class _Down(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + skip


class _UntracedLayer(nn.Module):
    """Untraceable parent joining two traceable children; ``leak`` also reads the hidden channels directly."""

    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.up, self.down, self.leak = _Up(), _Down(), leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        out = self.down(h, x) if x.sum() > -1e9 else x
        return out + h[..., :16] if self.leak else out


@pytest.mark.parametrize("leak", [False, True])
def test_children_of_an_untraced_parent_are_linked_only_when_verified(leak: bool) -> None:
    model = nn.Sequential(_UntracedLayer(leak), nn.Linear(16, 8)).eval()
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        y0 = model(x)
    rec = permute_channels(model, "2:4", example_input=x)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
    report = rec.report
    if leak:
        assert not report.permuted
        assert "undone" in {s.name: s.reason for s in report.skipped}["0.down.fc"]
    else:
        assert [p.name for p in report.permuted] == ["0.down.fc"]


def test_real_minilm_feed_forward_is_linked_and_permuted(minilm: nn.Module) -> None:
    import copy

    model = copy.deepcopy(minilm)
    ids = torch.randint(0, 1000, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        y0 = model(**batch)
    rec = permute_channels(model, "2:4", method="swap", example_input=batch, max_seconds_per_layer=0.2)
    with torch.no_grad():
        assert (model(**batch) - y0).abs().max() <= 1e-5
    names = {p.name for p in rec.report.permuted}
    assert sum(name.endswith("output.dense") and "attention" not in name for name in names) == 6
    fresh = copy.deepcopy(minilm)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(**batch), model(**batch))


def test_a_tampered_or_foreign_permutation_record_is_refused_by_name() -> None:
    from mp_plugin.errors import PlanFormatError, PlanMismatchError
    from mp_plugin.permute import PermutationRecord, align_to_permuted

    model = make_mlp((32, 64, 64, 16)).eval()
    dense = make_mlp((32, 64, 64, 16)).eval()
    good = permute_channels(model, "2:4", example_input=torch.randn(5, 32)).to_dict()
    assert good["folds"]
    for tamper in (
        lambda d: d["folds"][0]["site"].pop("ops"),
        lambda d: d["folds"][0].update(perm=[1, 0]),
        lambda d: d.update(report={}),
        lambda d: d["folds"][0]["site"].update(channels="x"),
    ):
        bad = {**good, "folds": [dict(f, site=dict(f["site"])) for f in good["folds"]]}
        tamper(bad)
        with pytest.raises(PlanFormatError):
            PermutationRecord.from_dict(bad)
    foreign = {**good, "folds": [dict(f, site=dict(f["site"], producers=["nowhere"])) for f in good["folds"]]}
    with pytest.raises(PlanMismatchError, match="nowhere"):
        align_to_permuted(dense, PermutationRecord.from_dict(foreign))
    smaller = make_mlp((32, 48, 48, 16)).eval()  # same names, other widths
    with pytest.raises(PlanMismatchError, match="does not fit"):
        align_to_permuted(smaller, PermutationRecord.from_dict(good))
