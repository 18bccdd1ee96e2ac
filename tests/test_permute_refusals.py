"""Channel permutation keeps the function or refuses: cases where a fold used to change the model silently."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mp_plugin.permute import permute_channels

torch.set_num_threads(1)


def _reasons(rec) -> dict[str, str]:
    return {s.name: s.reason for s in rec.report.skipped}


def _same_function(model: nn.Module, ref: nn.Module, x: torch.Tensor, train: bool = False) -> None:
    model.train(train)
    ref.train(train)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class _BufferTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
        self.register_buffer("scale", torch.rand(32) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) * self.scale)) + x * self.scale  # read inside and outside


class _QuantLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 16)
        self.register_buffer("scale", torch.rand(32) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2((self.fc1(x) / self.scale).clamp(-1, 1) * self.scale)  # read twice, one coupling


class _PlainAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 16)
        self.scale = torch.rand(32) + 0.5  # neither a parameter nor a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) * self.scale))


@pytest.mark.parametrize(
    "cls, reason",
    [(_BufferTwice, "read 2 times"), (_QuantLike, "read 2 times"), (_PlainAttribute, "plain tensor attribute")],
)
def test_tensors_read_twice_or_not_saved_are_refused_without_an_example(cls, reason: str) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    ref = copy.deepcopy(model)
    rec = permute_channels(model, "2:4")  # no example input: nothing checks afterwards
    assert reason in _reasons(rec)["fc2"]
    _same_function(model, ref, torch.randn(4, 32))


class _TrainBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        out = self.fc2(h)
        if self.training:
            out = out + self.aux(h.flip(-1))  # channels reversed: only in train mode
        return out


def test_a_coupling_that_differs_in_train_mode_is_refused() -> None:
    torch.manual_seed(0)
    model = _TrainBranch().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 16)
    rec = permute_channels(model, "2:4", example_input=x)
    assert "train and eval" in _reasons(rec)["fc2"]
    assert model.training is False and all(not m.training for m in model.modules())  # flags restored
    _same_function(model, ref, x, train=True)


def test_a_2d_pool_on_conv1d_channels_is_refused() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv1d(8, 16, 3, padding=1), nn.Conv1d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.avg_pool2d(self.a(x), 3, 1, 1))

    torch.manual_seed(0)
    model = M().eval()
    ref = copy.deepcopy(model)
    rec = permute_channels(model, "2:4")
    assert "2-D pool" in _reasons(rec)["b"]
    _same_function(model, ref, torch.randn(2, 8, 12))


class _Gained(nn.Conv2d):
    """A conv with a per-output-channel gain outside weight and bias (as timm's ScaledStdConv2d)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.gain, self.bias)


class _StaticPad(nn.Conv2d):
    """A conv that pads in its own forward (as efficientnet_pytorch's Conv2dStaticSamePadding): still per channel."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.static_padding(x), self.weight, self.bias)


@pytest.mark.parametrize("producer, permuted", [(_Gained, False), (_StaticPad, True)])
def test_layer_subclasses_are_probed_on_a_random_copy(producer, permuted: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(producer(8, 32, 3), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.linspace(0.1, 3.0, 32)[None, :, None, None])  # a permutation helps
    ref = copy.deepcopy(model)
    x = torch.randn(2, 8, 10, 10)
    rec = permute_channels(model, "2:4")
    assert bool(rec.report.permuted) == permuted, str(rec.report)
    if not permuted:
        assert "random copy" in _reasons(rec)["0"]
    _same_function(model, ref, x)


class _ChannelAttention(nn.Module):
    """Fused qkv + proj + num_heads, but attention between channels (XCA): not equivariant inside a head."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.full((heads, 1, 1), 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        attn = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(k, dim=-1).transpose(-2, -1)
        out = (attn * self.temperature).softmax(-1) @ v  # (b, heads, d, t): channels attend to channels
        return self.proj(out.permute(0, 3, 1, 2).reshape(b, t, c))


def test_an_attention_that_mixes_channels_in_a_head_is_refused_by_the_random_probe() -> None:
    torch.manual_seed(0)
    model = _ChannelAttention().eval()
    with torch.no_grad():
        model.proj.weight.mul_(torch.linspace(0.1, 3.0, 32))
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 32)
    rec = permute_channels(model, "2:4", example_input=x)
    assert "random weights" in _reasons(rec)["proj"]
    with torch.no_grad():
        for m in (model, ref):
            m.temperature.fill_(1.0)  # the tiny temperature hid the change from the real-weight check
    _same_function(model, ref, x)


def test_an_interrupted_permutation_leaves_the_model_as_it_was(monkeypatch) -> None:
    import mp_plugin.permute.api as api

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    ).eval()
    with torch.no_grad():
        for i in (2, 4, 6):  # column scales a permutation can spread over the 2:4 groups
            model[i].weight.mul_(torch.linspace(0.1, 3.0, model[i].in_features))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_search, real_fold, calls, folds = api._search, api.fold_coupling, [], []

    def search(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after earlier couplings were folded
            raise KeyboardInterrupt
        return real_search(*args, **kwargs)

    def fold(*args, **kwargs):
        folds.append(1)
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(api, "_search", search)
    monkeypatch.setattr(api, "fold_coupling", fold)
    with pytest.raises(KeyboardInterrupt):
        permute_channels(model, "2:4", method="interleave")
    assert len(folds) >= 2  # folded, then unfolded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_activation_importance_skips_a_coupling_the_example_never_runs() -> None:
    def mlp() -> nn.Sequential:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.aux = mlp(), mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            if x.sum() > 1e9:  # data-dependent: the parent does not trace
                y = y + self.aux(x)
            return y

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(4, 16)
    ref = copy.deepcopy(model)
    rec = permute_channels(model, "2:4", method="interleave", importance="activation", example_input=x)
    assert "did not run" in _reasons(rec)["aux.2"]
    _same_function(model, ref, x)
