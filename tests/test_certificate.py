"""Certificate: modes, zero budget, refusals, bad input, outputs, prune–restore, Gaussian form, hooks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_mlp
from mp_plugin.integrations.plotting import plot_certificate
from torch import nn

from mp_plugin.certificate import (
    ESTIMATE,
    EXACT,
    RIGOROUS,
    CertificateCallback,
    certify,
    certify_sparsifier,
    restore_gain,
    sequential_bound,
)
from mp_plugin.errors import (
    ArchitectureMismatchError,
    CertificateInputError,
    NonFiniteActivationError,
    NotCertifiable,
)
from mp_plugin.masks.select import unstructured_mask


def _prune(model: nn.Module, names: list[str], fraction: float = 0.5) -> nn.Module:
    pruned = copy.deepcopy(model)
    mods = dict(pruned.named_modules())
    with torch.no_grad():
        for name in names:
            w = mods[name].weight
            w.mul_(unstructured_mask(w, int(fraction * w.numel())))
    return pruned


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).double()


def test_empirical_margin_test_is_exact_and_flags_flips():
    dense = make_mlp((16, 32, 32, 10))
    pruned = _prune(dense, ["0", "2", "4"], 0.7)
    x = torch.randn(256, 16)
    cert = certify(dense, pruned, x, mode="empirical")
    zd, zp = _logits(dense, x), _logits(pruned, x)
    changed = (zd.argmax(1) != zp.argmax(1)).numpy()
    assert changed.any(), "the test needs some flipped predictions"
    assert not (cert.preserved & changed).any()  # preserved ⇒ same prediction
    assert (~cert.preserved[changed]).all()
    assert 0 < cert.preserved_fraction < 1
    assert cert.eta_kind == EXACT and cert.measured["agreement"] == pytest.approx(1 - changed.mean())


@pytest.mark.parametrize("mode", ["empirical", "bound", "jacobian"])
def test_zero_budget_certifies_every_sample(mode):
    dense = make_mlp((8, 12, 12, 5))
    x = torch.randn(32, 8)
    cert = certify(dense, copy.deepcopy(dense), x, mode=mode)
    assert cert.budget == 0.0 and cert.preserved.all() and not cert.layers


@pytest.mark.parametrize("mode", ["empirical", "bound", "jacobian"])
def test_pruning_inputs_that_are_always_zero_is_perfect(mode):
    dense = make_mlp((8, 12, 12, 5))
    with torch.no_grad():
        dense[0].bias[:4] = -1e3  # hidden units 0..3 are dead after the ReLU on any reasonable input
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[2].weight[:, :4] = 0.0  # remove every weight that reads a dead unit
    x = torch.randn(64, 8)
    cert = certify(dense, pruned, x, mode=mode)
    assert [layer.name for layer in cert.layers] == ["2"]
    assert cert.layers[0].norms["r_l1"] > 0
    assert cert.budget == 0.0 and cert.preserved.all()


def test_bound_multi_layer_labels_and_sequential_context():
    dense = make_mlp((8, 12, 12, 5))
    pruned = _prune(dense, ["0", "2"])
    x = torch.randn(16, 8)
    joint = certify(dense, pruned, x, mode="bound")
    seq = certify(dense, pruned, x, mode="bound", sequential=True)
    assert joint.eta_kind == ESTIMATE and any("sequential=True" in n for n in joint.notes)
    assert seq.eta_kind == RIGOROUS and seq.layers[1].context.startswith("after pruning")
    # layer 0 sees the same input either way; layer 2's ψ₁ comes from the pruned first layer
    torch.testing.assert_close(torch.as_tensor(seq.layers[0].rpsi_inf), torch.as_tensor(joint.layers[0].rpsi_inf))
    relu = nn.functional.relu
    psi = relu(nn.functional.linear(x.double(), pruned[0].weight.double(), pruned[0].bias.double()))
    r = (dense[2].weight - pruned[2].weight).double()
    torch.testing.assert_close(torch.as_tensor(seq.layers[1].rpsi_inf), (psi @ r.T).abs().amax(1))


def test_bound_lipschitz_is_the_product_of_row_sum_norms():
    dense = make_mlp((8, 12, 10, 5))
    value, ops = sequential_bound(dense, "0")
    expected = float(dense[2].weight.detach().abs().sum(1).max() * dense[4].weight.detach().abs().sum(1).max())
    assert value == pytest.approx(expected, rel=1e-6)
    assert len(ops) == 4


def test_jacobian_estimate_never_exceeds_the_bound():
    torch.manual_seed(1)
    dense = make_mlp((10, 16, 16, 16, 6))
    pruned = _prune(dense, ["2"])
    x = torch.randn(24, 10)
    jac = certify(dense, pruned, x, mode="jacobian")
    bnd = certify(dense, pruned, x, mode="bound")
    lj, lb = jac.layers[0].lipschitz, bnd.layers[0].lipschitz
    assert jac.eta_kind == ESTIMATE and jac.layers[0].lipschitz_kind == ESTIMATE
    assert (lj <= lb * (1 + 1e-6)).all() and (lj > 0).all()
    # on the last hidden layer the local Jacobian is W_out restricted to active units: check one sample exactly
    last = certify(dense, _prune(dense, ["4"]), x[:1], mode="jacobian")
    h = torch.relu(dense[4](dense[3](dense[2](dense[1](dense[0](x[:1]))))))
    active = (dense[4](dense[3](dense[2](dense[1](dense[0](x[:1]))))) > 0).double()
    assert h.shape[1] == 16
    expected = float((dense[6].weight.detach().double().abs() * active).sum(1).max())
    assert last.layers[0].lipschitz[0] == pytest.approx(expected, rel=1e-5)


def test_bound_folds_eval_batchnorm_and_stays_sound():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(12, 12),
        nn.LeakyReLU(0.1),
        nn.Sequential(nn.Linear(12, 4)),
    )
    with torch.no_grad():
        model[3].running_var.uniform_(0.2, 3.0)
        model[3].running_mean.normal_()
        model[3].weight.normal_()
    model.eval()
    pruned = _prune(model, ["0", "2", "6", "8.0"], 0.6)
    x = torch.randn(64, 6)
    cert = certify(model, pruned, x, mode="bound", sequential=True)
    shift = (_logits(model, x) - _logits(pruned, x)).abs().amax(1)
    assert (shift.numpy() <= cert.eta + 1e-5).all()
    assert any("folded" in op for op in cert.layers[0].ops)  # BN after a downstream Linear: row-wise fold
    assert any("BatchNorm (eval) max" in op for op in cert.layers[1].ops)  # BN right after the pruned layer


def test_conv_chain_bound_and_perturbation_match_unfold():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    pruned = _prune(model, ["2", "6"], 0.5)
    x = torch.randn(8, 3, 12, 12)
    cert = certify(model, pruned, x, mode="bound", sequential=True)
    shift = (_logits(model, x) - _logits(pruned, x)).abs().amax(1)
    assert (shift.numpy() <= cert.eta + 1e-5).all()
    psi = torch.relu(model[0](x)).double()
    cols = nn.functional.unfold(psi, 3, padding=1, stride=2)  # (B, 8·9, L)
    r = (model[2].weight - pruned[2].weight).double().reshape(8, -1)
    expected = torch.einsum("oc,bcl->bol", r, cols).abs().flatten(1).amax(1)
    torch.testing.assert_close(torch.as_tensor(cert.layers[0].rpsi_inf), expected)


def test_token_inputs_take_the_max_over_tokens_and_channels():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10, 3)).eval()
    pruned = _prune(model, ["0"], 0.5)
    x = torch.randn(5, 4, 6)  # 4 tokens of width 6
    cert = certify(model, pruned, x, mode="empirical")
    r = (model[0].weight - pruned[0].weight).double()
    expected = (x.double() @ r.T).abs().amax(dim=(1, 2))
    torch.testing.assert_close(torch.as_tensor(cert.layers[0].rpsi_inf), expected)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0].mean(1)


@pytest.mark.parametrize(
    ("tail", "needle"),
    [
        (nn.LayerNorm(8), "LayerNorm"),
        (nn.Softmax(dim=-1), "softmax"),
        (nn.GELU(), "GELU"),
        (nn.Sequential(nn.Unflatten(1, (1, 8)), nn.MultiheadAttention(8, 2)), "MultiheadAttention"),
    ],
)
def test_bound_refuses_ops_it_cannot_bound(tail, needle):
    model = nn.Sequential(nn.Linear(8, 8), tail, nn.Linear(8, 4)).eval()
    with pytest.raises(NotCertifiable, match=needle):
        sequential_bound(model, "0")


def test_bound_refuses_custom_forward_and_attention_models():
    resid = nn.Sequential(nn.Linear(8, 8), _Block(), nn.Linear(8, 3)).eval()
    with pytest.raises(NotCertifiable, match="_Block"):
        certify(resid, _prune(resid, ["1.fc"]), torch.randn(4, 8), mode="bound")
    attn = nn.Sequential(nn.Unflatten(1, (2, 8)), nn.Linear(8, 8), _Attention(), nn.Linear(8, 3)).eval()
    with pytest.raises(NotCertifiable, match="_Attention"):
        certify(attn, _prune(attn, ["1"]), torch.randn(4, 16), mode="bound")
    # empirical mode handles both
    assert certify(attn, _prune(attn, ["1"]), torch.randn(4, 16)).eta_kind == EXACT


def test_bound_refuses_train_mode_batchnorm():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()
    pruned = _prune(model, ["0"])
    model.train()
    with pytest.raises(NotCertifiable, match="train mode"):
        certify(model, pruned, torch.randn(8, 4), mode="bound")


def test_bad_inputs_raise_clear_errors():
    dense = make_mlp((8, 12, 5))
    x = torch.randn(16, 8)
    with pytest.raises(ArchitectureMismatchError, match="shape"):
        certify(dense, make_mlp((8, 13, 5)), x)
    other = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5))
    with pytest.raises(ArchitectureMismatchError, match="Tanh"):
        certify(dense, other, x)
    with pytest.raises(CertificateInputError, match=r"\(16,\)"):
        certify(dense, dense, x, labels=torch.zeros(15, dtype=torch.long))
    with pytest.raises(CertificateInputError, match="mode"):
        certify(dense, dense, x, mode="exact")
    with pytest.raises(CertificateInputError, match="not Linear/Conv"):
        certify(dense, dense, x, layers=["1"])
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(NonFiniteActivationError):
        certify(dense, _prune(dense, ["0"]), bad)
    blowup = copy.deepcopy(dense)
    with torch.no_grad():
        blowup[0].weight.fill_(3e38)
    with pytest.raises(NonFiniteActivationError, match="'2'"):
        certify(blowup, _prune(blowup, ["2"]), x + 10)


def test_elastic_net_check_and_exact_objective():
    dense = make_mlp((8, 12, 12, 5))
    pruned = _prune(dense, ["2"], 0.3)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    r = (dense[2].weight - pruned[2].weight).detach().double()
    big = certify(dense, pruned, x, y, mode="bound", lambdas=(10.0, 100.0))
    penalty = 100.0 * float((r * r).sum()) + 10.0 * float(r.abs().sum())
    assert big.elastic_net["penalty"] == pytest.approx(penalty)
    assert big.elastic_net["certified"] is (big.budget < penalty) and big.elastic_net["certified"]
    assert big.elastic_net["objective_decreased"]  # certified ⇒ the real objective decreased
    small = certify(dense, pruned, x, y, mode="bound", lambdas=(0.0, 1e-6))
    assert small.elastic_net["certified"] is False
    emp = certify(dense, pruned, x, y, mode="empirical", lambdas=(0.0, 1e-6))
    assert emp.elastic_net["certified"] is None and emp.elastic_net["verdict"].startswith("refuted")


def test_restore_gain_matches_the_certificate_budgets():
    torch.manual_seed(4)
    dense = make_mlp((8, 12, 12, 5))
    w = dense[2].weight.detach()
    order = w.abs().flatten().argsort()
    p_mask = torch.zeros(w.numel(), dtype=torch.bool)
    p_mask[order[:30]] = True
    q_mask = torch.zeros(w.numel(), dtype=torch.bool)
    q_mask[order[30:60]] = True
    p_mask, q_mask = p_mask.view_as(w), q_mask.view_as(w)
    s_mask = ~(p_mask | q_mask)
    x = torch.randn(16, 8)
    psi = torch.relu(dense[0](x)).detach()
    lip, _ = sequential_bound(dense, "2")
    res = restore_gain(w, s_mask, q_mask, p_mask, psi, lip, lambdas=(0.01, 0.1))
    only_p = copy.deepcopy(dense)
    both = copy.deepcopy(dense)
    with torch.no_grad():
        only_p[2].weight[p_mask] = 0
        both[2].weight[p_mask | q_mask] = 0
    assert res.budget_p == pytest.approx(certify(dense, only_p, x, mode="bound").budget, rel=1e-9)
    assert res.budget_qp == pytest.approx(certify(dense, both, x, mode="bound").budget, rel=1e-9)
    q = w * q_mask
    assert res.penalty_q == pytest.approx(0.1 * float((q * q).sum()) + 0.01 * float(q.abs().sum()), rel=1e-6)
    assert res.restore_improves == (res.budget_qp - res.budget_p > res.penalty_q)
    with pytest.raises(CertificateInputError, match="disjoint"):
        restore_gain(w, s_mask | q_mask, q_mask, p_mask, psi, lip, lambdas=(0.0, 0.0))


def test_gaussian_form_covers_a_gaussian_removed_component():
    torch.manual_seed(5)
    dense = make_mlp((64, 96, 10))
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        noise = 0.02 * torch.randn(10, 96)
        pruned[2].weight.sub_(noise)  # R = noise, iid Gaussian and independent of ψ₁
    x = torch.randn(32, 64)
    cert = certify(dense, pruned, x, mode="bound")
    g = cert.layers[0].gaussian
    assert g["sigma_plus"] > 0 and g["entry_std"] == pytest.approx(0.02, rel=0.35)
    assert cert.budget <= g["value"] and cert.gaussian["value"] == pytest.approx(g["value"])
    assert certify(dense, copy.deepcopy(dense), x, mode="bound").gaussian["value"] == 0.0


def test_outputs_json_summary_and_plot(tmp_path):
    dense = make_mlp((8, 12, 12, 5))
    cert = certify(
        dense,
        _prune(dense, ["0", "2"]),
        torch.randn(20, 8),
        torch.randint(0, 5, (20,)),
        mode="bound",
        sequential=True,
        lambdas=(1e-3, 1e-2),
    )
    text = cert.summary()
    assert "mode=bound" in text and RIGOROUS in text and "accuracy-change bound" in text
    data = json.loads(cert.save_json(tmp_path / "c.json").read_text())
    assert data["mode"] == "bound" and data["eta_kind"] == RIGOROUS and len(data["eta"]) == 20
    assert data["layers"][0]["lipschitz_kind"] == RIGOROUS and data["layers"][1]["gaussian"]["kind"]
    png = plot_certificate(cert, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_callback_in_a_plain_training_loop(tmp_path):
    torch.manual_seed(6)
    model = make_mlp((8, 16, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    records = []
    cb = CertificateCallback(
        model,
        x[:16],
        y[:16],
        every_n_steps=3,
        log=records.append,
        json_path=tmp_path / "hist.json",
        lambdas=(0.0, 1e-3),
    )
    mask = unstructured_mask(model[0].weight, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(7):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model[0].weight.mul_(mask)
        cb.step(model, step)
    assert [r["step"] for r in cb.history] == [0, 3, 6] and records == cb.history
    hist = json.loads((tmp_path / "hist.json").read_text())["history"]
    assert hist[-1]["budget"] == pytest.approx(cb.last.budget) and cb.last.mode == "empirical"
    assert hist[-1]["budget"] > hist[0]["budget"] > 0  # drifting away from the frozen dense snapshot


def test_torch_ao_sparsifier_adapter_does_not_touch_the_model():
    from torch.ao.pruning import WeightNormSparsifier

    model = make_mlp((8, 16, 16, 4))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 8)
    cert = certify_sparsifier(sparsifier, x, mode="bound", sequential=True)
    after = model.state_dict()
    assert isinstance(model[0].weight, torch.Tensor)  # still parametrized and usable
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [layer.name for layer in cert.layers] == ["0", "2"]
    masked = model[0].weight.detach()
    assert cert.layers[0].norms["r_changed"] == int((masked == 0).sum())
    dense = make_mlp((8, 16, 16, 4))
    manual = copy.deepcopy(dense)
    with torch.no_grad():
        manual[0].weight.copy_(model[0].weight)
        manual[2].weight.copy_(model[2].weight)
    ref = certify(dense, manual, x, mode="bound", sequential=True)
    assert cert.budget == pytest.approx(ref.budget, rel=1e-9)


def test_modelopt_adapter_certifies_a_sparsified_copy():
    mts = pytest.importorskip("modelopt.torch.sparsity")
    from mp_plugin.integrations.modelopt_certificate import certify_modelopt

    dense = make_mlp((16, 32, 32, 8))
    sparse = mts.sparsify(copy.deepcopy(dense), "sparse_magnitude")
    cls = type(sparse[0])
    x = torch.randn(16, 16)
    cert = certify_modelopt(dense, sparse, x, mode="bound", sequential=True)
    assert type(sparse[0]) is cls  # still a ModelOpt sparse module
    assert [layer.name for layer in cert.layers] == ["0", "2", "4"]
    assert cert.layers[0].norms["r_changed"] == 16 * 32 // 2  # 2:4 removes half of each layer
    assert cert.eta_kind == RIGOROUS and cert.violations == 0


def test_certificate_aligns_dense_to_a_channel_permuted_pruned_model() -> None:
    """After apply(permute=...), per-layer R compares like with like: R lives only on pruned entries."""
    import mp_plugin
    from mp_plugin.permute import align_to_permuted, folds_from_data, folds_to_data
    from mp_plugin.permute.record import PermutationRecord

    dense = make_mlp((32, 64, 64, 12), seed=3).eval()
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    pruned = copy.deepcopy(dense)
    the_plan = mp_plugin.plan(pruned, 0.5, "2:4", "seb")
    mp_plugin.apply(pruned, the_plan, calibration=x, permute="swap")
    record = PermutationRecord.from_plan(the_plan)
    assert record is not None and record.report.permuted, "the test needs at least one permuted coupling"

    aligned = align_to_permuted(dense, the_plan)
    with torch.no_grad():
        assert torch.allclose(aligned(x), dense(x), atol=1e-5)  # same function, permuted basis
    cert = certify(dense, pruned, x, mode="bound", plan=the_plan)
    assert any("aligned" in n for n in cert.notes)
    for layer in cert.layers:
        assert layer.norms["mask_case"], layer.name  # R = A − S is zero wherever S keeps a weight
        assert layer.norms["r_fro2"] == pytest.approx(layer.norms["l2_drop"], rel=1e-9, abs=1e-12)
    # the fold record survives a round trip through plain data (what plan files and checkpoints store)
    restored = PermutationRecord(record.permutations, folds_from_data(folds_to_data(record.folds)))
    again = align_to_permuted(dense, restored)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), aligned.state_dict().values()))
    # without the alignment the permuted rows/columns would show up as a huge, meaningless R
    naive = certify(dense, pruned, x, mode="empirical")
    assert not all(layer.norms["mask_case"] for layer in naive.layers)
    assert cert.measured["agreement"] == pytest.approx(naive.measured["agreement"])


def test_permutation_record_survives_save_pruned_checkpoint(tmp_path) -> None:
    """A permuted, pruned model saved as safetensors loads back with its fold record; certify aligns."""
    import mp_plugin
    from mp_plugin.evaluation.models import BUILTIN_MODELS, load_model, register_builtin_model, save_pruned_checkpoint

    register_builtin_model("_test_perm_mlp")(lambda: make_mlp((32, 64, 64, 12), seed=3).eval())
    try:
        dense = load_model("_test_perm_mlp")
        x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
        pruned = copy.deepcopy(dense)
        the_plan = mp_plugin.plan(pruned, 0.5, "2:4", "seb")
        mp_plugin.apply(pruned, the_plan, calibration=x, permute="swap")
        path = save_pruned_checkpoint(pruned, tmp_path, plan=the_plan)
        loaded = load_model("_test_perm_mlp", checkpoint=path)
        saved_plan = mp_plugin.PrunePlan.load(tmp_path / "plan.json")
        assert the_plan.permutation and saved_plan.permutation["permutations"] == the_plan.permutation["permutations"]
        cert = certify(dense, loaded, x, mode="bound", plan=saved_plan)
        assert any("aligned" in n for n in cert.notes)
        assert all(layer.norms["mask_case"] for layer in cert.layers)
        unaligned = certify(dense, loaded, x, mode="empirical")  # without the plan nothing can be aligned
        assert not all(layer.norms["mask_case"] for layer in unaligned.layers)
    finally:
        BUILTIN_MODELS.pop("_test_perm_mlp", None)


def _bound_violations(model: nn.Module, x: torch.Tensor) -> tuple[str, int]:
    """Certify ``model`` against a copy with one input column of the first layer cut; (claim, violations)."""
    from mp_plugin.certificate import certify

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned[0].weight[:, 0] = 0
    cert = certify(model, pruned, x, mode="bound", gaussian=False)
    return cert.claim, int(cert.violations)


def test_bound_counts_sum_pooling_and_does_not_fold_batchnorm_onto_a_linears_last_axis():
    """Two cases that used to be 'proven' with samples whose prediction changed: the bound now holds."""
    torch.manual_seed(0)
    summed = nn.Sequential(
        nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8)), nn.AvgPool2d(4, divisor_override=1), nn.Flatten()
    ).eval()
    assert _bound_violations(summed, torch.randn(256, 4)) == ("proven", 0)
    crossed = nn.Sequential(
        nn.Linear(8, 16), nn.Unflatten(1, (4, 4)), nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4), nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():  # BatchNorm1d scales axis 1 of (B, 4, 4); the Linear before it acts on axis 2
        crossed[3].running_var.copy_(torch.tensor([1e-4, 1.0, 1.0, 1.0]))
        crossed[2].weight.copy_(torch.diag(torch.tensor([1e-3, 1.0, 1.0, 1.0])))
    assert _bound_violations(crossed, torch.randn(256, 8)) == ("proven", 0)


def test_bound_mode_refuses_half_precision_weights():
    from mp_plugin.certificate import certify
    from mp_plugin.errors import NotCertifiable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval().to(torch.bfloat16)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned[0].weight[:, 0] = 0
    with pytest.raises(NotCertifiable, match="float32 or float64"):
        certify(model, pruned, torch.randn(16, 8, dtype=torch.bfloat16), mode="bound")
