"""apply(model, plan) across timm architectures and real models, sparsity_report, and bad input."""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import replace

import pytest
import torch
from conftest import TIMM_ARCHS as ARCHS
from conftest import make_mlp

import mp_plugin
from mp_plugin import MaskKeeper, MPPluginError, PatternError, PlanMismatchError, sparsity_report
from mp_plugin.layers.calibration import calibration_loss, capture_covariances
from mp_plugin.layers.discovery import LayerSelection
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.select import kn_group_counts
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan


def _as_unstructured(p: PrunePlan) -> PrunePlan:
    """The same budgets with every layer unstructured (plans are editable data)."""
    layers = [replace(lp, pattern="unstructured", sparsity=lp.unstructured_budget) for lp in p.layers]
    return replace(p, pattern="unstructured", layers=layers, applied={})


@pytest.fixture(scope="module", params=ARCHS)
def timm_case(request):
    timm = pytest.importorskip("timm")
    model = timm.create_model(request.param, pretrained=False).eval()
    fast = PlanConfig(gram_dtype="float32")  # keeps the suite quick; float32 Gram is enough for budgets
    return request.param, model, plan(model, sparsity=0.5, pattern="2:4", method="magnitude", config=fast)


@pytest.mark.parametrize("kind", ["2:4", "unstructured"])
def test_apply_across_timm_architectures(timm_case, kind: str) -> None:
    name, dense, kn_plan = timm_case
    p = copy.deepcopy(kn_plan) if kind == "2:4" else _as_unstructured(kn_plan)
    model = copy.deepcopy(dense)
    keys = set(model.state_dict())
    modules = p.check_model(model)
    before = {lp.name: modules[lp.name].weight.detach().clone() for lp in p.layers}
    out = mp_plugin.apply(model, p)
    assert out is model
    assert set(model.state_dict()) == keys  # still an ordinary model
    for lp in p.layers:
        w, w0 = modules[lp.name].weight.detach(), before[lp.name]
        assert torch.equal(w, w0 * (w != 0)), lp.name  # only zeroing, nothing else changed
        pat = Pattern.parse(lp.pattern)
        if pat.is_kn:
            expected = kn_group_counts(w0, pat.n).clamp_max(pat.k)
            assert torch.equal(kn_group_counts(w, pat.n), expected), lp.name
        elif pat.kind == "unstructured":
            assert int((w == 0).sum()) == max(lp.n_prune, int((w0 == 0).sum())), lp.name
        else:
            assert torch.equal(w, w0)
    report = sparsity_report(model, p)
    assert report.kn_valid
    if kind == "unstructured":
        assert report.total_zeros >= sum(lp.n_prune for lp in p.layers)
        assert report.total_sparsity == pytest.approx(0.5, abs=1e-3)
    else:
        assert all(lp.pattern in ("2:4", "dense") for lp in p.layers)
        assert sum(lp.pattern == "2:4" for lp in p.layers) >= 0.9 * len(p.layers)
    assert p.applied["method"] == "magnitude"
    assert set(p.applied["layers"]) == {lp.name for lp in p.layers}
    assert p.applied["achieved_sparsity"] == pytest.approx(report.total_sparsity)
    # a second call changes nothing
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    mp_plugin.apply(model, p)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    if name in ("vit_tiny_patch16_224", "resnet18", "mobilenetv3_small_100"):
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            y, y0 = model(x), dense(x)
        assert torch.isfinite(y).all() and not torch.allclose(y, y0)


def test_masks_hold_through_20_adamw_steps_on_convnext() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    p = plan(model, sparsity=0.5, pattern="2:4", method="magnitude")
    mp_plugin.apply(model, p)
    zeros = {k: v == 0 for k, v in model.state_dict().items() if k.endswith("weight")}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    MaskKeeper(model).attach(opt)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(2, 3, 32, 32, generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (2,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sparsity_report(model, p).kn_valid
    for k, v in model.state_dict().items():
        if k in zeros and zeros[k].any():
            assert torch.equal(v == 0, zeros[k]), k


def _photos(count: int = 4, size: int = 64) -> torch.Tensor:
    from test_cast import _photo_batch

    return _photo_batch(count, size)


def test_cast_apply_on_efficientnet_lite0(efficientnet_lite0) -> None:
    dense = efficientnet_lite0
    batch = _photos()
    p_cast = plan(dense, sparsity=0.5, pattern="2:4", method="seb")
    p_mag = copy.deepcopy(p_cast)
    cast_model, mag_model = copy.deepcopy(dense), copy.deepcopy(dense)
    kn = {lp.name: 4 for lp in p_cast.layers if lp.pattern == "2:4"}
    stats = capture_covariances(dense, kn, batch)
    mp_plugin.apply(cast_model, p_cast, calibration=batch, method="cast")
    mp_plugin.apply(mag_model, p_mag, method="magnitude")
    assert sparsity_report(cast_model, p_cast).kn_valid
    assert p_cast.applied["method"] == "cast"
    assert set(p_cast.applied["calibration_rows"]) == set(kn)
    cast_mods, mag_mods, dense_mods = (dict(m.named_modules()) for m in (cast_model, mag_model, dense))
    for name in kn:
        d = dense_mods[name].weight.detach()
        lc = float(calibration_loss(d - cast_mods[name].weight.detach(), stats[name]))
        lm = float(calibration_loss(d - mag_mods[name].weight.detach(), stats[name]))
        assert lc <= lm * (1 + 1e-9), name
    # and the logits on held-out crops move less than with magnitude 2:4
    held_out = _photos(count=6, size=72)[2:]
    with torch.no_grad():
        ref = dense(held_out)
        err_cast = (cast_model(held_out) - ref).square().mean()
        err_mag = (mag_model(held_out) - ref).square().mean()
    assert err_cast < err_mag


def test_cast_with_prior_and_mixed_auto_patterns() -> None:
    model = make_mlp((64, 128, 128, 32))
    cfg = PlanConfig(selection=LayerSelection(exclude_head=False))
    p = plan(model, sparsity=0.3, pattern="auto", method="magnitude", config=cfg)
    p.layers[0].pattern, p.layers[1].pattern, p.layers[2].pattern = "2:4", "12:16", "dense"
    dense_last = model[4].weight.detach().clone()
    x = torch.randn(256, 64)
    mp_plugin.apply(model, p, calibration=x, method="cast", prior_alpha=0.5)
    report = sparsity_report(model, p)
    assert report.kn_valid
    assert [round(layer.sparsity, 4) for layer in report.layers] == [0.5, 0.25, 0.0]
    assert torch.equal(model[4].weight, dense_last)
    assert p.applied["cast"]["prior_alpha"] == 0.5


def test_grouped_conv_cast_when_selected() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, groups=2)
    )
    default = plan(model, sparsity=0.5, pattern="2:4", method="magnitude")
    assert [s["name"] for s in default.skipped] == ["2"]  # grouped conv: a documented skip
    cfg = PlanConfig(selection=LayerSelection(exclude_grouped=False))
    p = plan(model, sparsity=0.5, pattern="2:4", method="magnitude", config=cfg)
    x = torch.randn(4, 8, 12, 12)
    dense = copy.deepcopy(model)
    stats = capture_covariances(dense, {"2": 4}, x)
    mag = copy.deepcopy(model)
    mp_plugin.apply(mag, copy.deepcopy(p))
    mp_plugin.apply(model, p, calibration=x, method="cast")
    assert sparsity_report(model, p).kn_valid
    loss = {
        name: float(calibration_loss(dense[2].weight.detach() - m[2].weight.detach(), stats["2"], conv_groups=2))
        for name, m in (("cast", model), ("mag", mag))
    }
    assert loss["cast"] < loss["mag"]


def test_sparsity_report_without_plan_and_serialisation() -> None:
    model = make_mlp((32, 64, 16))
    with torch.no_grad():
        model[0].weight[:, :8] = 0
    report = sparsity_report(model)
    assert [layer.name for layer in report.layers] == ["0", "2"]
    assert report.layers[0].sparsity == 0.25 and report.layers[0].kn_valid is None
    assert report.total_zeros == 64 * 8
    d = json.loads(json.dumps(report.to_dict()))
    assert d["total_zeros"] == 512 and d["layers"][0]["shape"] == [64, 32]
    table = report.to_table()
    assert "total:" in table and "0.2500" in table


def test_apply_stays_the_function_after_submodule_import() -> None:
    import mp_plugin.pruning.apply_plan  # noqa: F401 - importing the module must not shadow mp_plugin.apply

    model = make_mlp()
    p = plan(model, sparsity=0.5, pattern="2:4", method="magnitude")
    mp_plugin.apply(model, p)
    assert callable(mp_plugin.apply) and mp_plugin.apply.__module__ == "mp_plugin.pruning.apply_plan"
    assert mp_plugin.sparsity_report(model, p).kn_valid


# ------------------------------------------------------------------ bad input


def test_plan_model_mismatch() -> None:
    p = plan(make_mlp((32, 64, 64, 10)), sparsity=0.5)
    with pytest.raises(PlanMismatchError, match="expects weight"):
        mp_plugin.apply(make_mlp((32, 48, 64, 10)), p)
    with pytest.raises(PlanMismatchError, match="no layer"):
        mp_plugin.apply(torch.nn.Sequential(torch.nn.Linear(32, 64)), p)
    with pytest.raises(PlanMismatchError):
        sparsity_report(make_mlp((32, 48, 64, 10)), p)


def test_indivisible_width_is_kept_dense_or_rejected() -> None:
    model = make_mlp((30, 64, 10))
    p = plan(model, sparsity=0.5, pattern="2:4", method="magnitude")
    first = p.layer("0")
    assert first.pattern == "dense" and "not divisible" in first.note  # documented skip
    first.pattern = "2:4"  # a hand-edited plan that cannot work
    with pytest.raises(PatternError, match="not divisible"):
        mp_plugin.apply(model, p)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "2:32", "0:4"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        plan(make_mlp(), sparsity=0.5, pattern=pattern)


def test_shared_weights_pruned_once_or_rejected() -> None:
    first, second = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    second.weight = first.weight  # two modules, one tied weight
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second, torch.nn.ReLU(), torch.nn.Linear(32, 8))
    p = plan(model, sparsity=0.5, pattern="2:4", method="magnitude")
    assert [lp.name for lp in p.layers] == ["0", "4"]
    assert [s["reason"] for s in p.skipped] == ["shares its weight with 0"]  # a documented skip
    mp_plugin.apply(model, p)
    assert sparsity_report(model).layers[0].sparsity == 0.5  # one tensor, pruned once
    assert torch.equal(model[2].weight == 0, model[0].weight == 0)
    p.layers.append(replace(p.layers[0], name="2"))
    with pytest.raises(PlanMismatchError, match="share one weight"):
        mp_plugin.apply(model, p)


def test_method_and_calibration_errors() -> None:
    model = make_mlp()
    p = plan(model, sparsity=0.5, pattern="2:4", budget="magnitude")
    with pytest.raises(MPPluginError, match="unknown projection"):
        mp_plugin.apply(model, p, projection="wanda")
    with pytest.raises(MPPluginError, match="calibration"):
        mp_plugin.apply(model, p, projection="cast")


def test_old_method_keywords_warn_and_keep_working() -> None:
    """plan(method=) is the budget, apply(method=) the projection: both still work, with a DeprecationWarning."""
    model = make_mlp()
    new = plan(model, sparsity=0.5, pattern="2:4", budget="uniform")
    with pytest.warns(DeprecationWarning, match="budget="):
        old = plan(model, sparsity=0.5, pattern="2:4", method="uniform")
    assert old.method == new.method == "uniform"
    assert [lp.n_prune for lp in old.layers] == [lp.n_prune for lp in new.layers]
    a, b = make_mlp(), make_mlp()
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, a[0].in_features)
    mp_plugin.apply(a, plan(a, 0.5, "2:4", "seb"), calibration=x, projection="cast")
    with pytest.warns(DeprecationWarning, match="projection="):
        mp_plugin.apply(b, plan(b, 0.5, "2:4", "seb"), calibration=x, method="cast")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert b is not a and any(bool((p == 0).any()) for p in b.parameters())


def test_adapter_method_splits_into_budget_and_projection() -> None:
    from mp_plugin.planning.build import split_method

    assert split_method("seb-hill", "magnitude", None, "X") == ("seb-hill", "magnitude")
    with pytest.warns(DeprecationWarning):
        assert split_method("seb", "magnitude", "cast", "X") == ("seb", "cast")
    with pytest.warns(DeprecationWarning):
        assert split_method("seb", "magnitude", "uniform", "X") == ("uniform", "magnitude")
    with pytest.warns(DeprecationWarning):  # the old value passed positionally
        assert split_method("cast", "magnitude", None, "X") == ("seb", "cast")


def test_permute_request() -> None:
    model = make_mlp((32, 64, 64, 10))
    p = plan(model, sparsity=0.5, pattern="2:4", method="magnitude")
    try:  # mp_plugin.permute is built by a separate work item
        available = hasattr(importlib.import_module("mp_plugin.permute"), "permute_channels")
    except ModuleNotFoundError:
        available = False
    if not available:
        with pytest.raises(MPPluginError, match="mp_plugin.permute"):
            mp_plugin.apply(model, p, permute="interleave")
        return
    x = torch.randn(8, 32)
    with torch.no_grad():
        y0 = model(x)
    permuted = copy.deepcopy(model)
    mp_plugin.permute_channels(permuted, pattern="2:4", method="interleave")
    with torch.no_grad():
        assert torch.allclose(permuted(x), y0, atol=1e-5)
    mp_plugin.apply(model, p, permute="interleave")
    assert sparsity_report(model, p).kn_valid and p.applied["permute"] == "interleave"
    unstructured = _as_unstructured(plan(make_mlp(), sparsity=0.5))
    with pytest.raises(PatternError, match="no k:n layer"):
        mp_plugin.apply(make_mlp(), unstructured, permute=True)


def test_cast_apply_on_minilm_with_token_batches(minilm) -> None:
    texts = [
        "The cat sat on the mat.",
        "Random matrix theory predicts the bulk of the spectrum.",
        "Pruning removes weights that carry little signal.",
        "A sentence encoder maps text to a vector.",
    ]
    tok = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    batch = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    p = plan(minilm, sparsity=0.5, pattern="2:4", method="seb", config=PlanConfig(gram_dtype="float32"))
    p_mag = copy.deepcopy(p)
    model, mag = copy.deepcopy(minilm), copy.deepcopy(minilm)
    mp_plugin.apply(model, p, calibration=batch, method="cast")
    mp_plugin.apply(mag, p_mag, method="magnitude")
    assert sparsity_report(model, p).kn_valid
    rows = p.applied["calibration_rows"]
    n_tokens = int(tok["attention_mask"].sum())
    assert n_tokens < tok["input_ids"].numel()  # the batch is padded
    for name, r in rows.items():  # one row per real token (padding not counted); the pooler sees the B [CLS] tokens
        assert r == (len(texts) if "pooler" in name else n_tokens), name
    with torch.no_grad():
        ref = minilm(**batch)
        sim = torch.nn.functional.cosine_similarity(model(**batch), ref)
        sim_mag = torch.nn.functional.cosine_similarity(mag(**batch), ref)
    assert float(sim.mean()) > float(sim_mag.mean())  # embeddings of the calibration texts move less


def test_mask_keeper_follows_a_replaced_module():
    """A module swapped out after the keeper was built (e.g. by an epoch-end hook) keeps its mask too."""
    from mp_plugin.masks.keep import MaskKeeper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:, 0] = 0
    keeper = MaskKeeper(model)
    replacement = torch.nn.Linear(8, 8)  # dense: column 0 non-zero again
    model[0] = replacement
    assert keeper.violations() == 8  # the new weight is the one checked
    keeper.apply()
    assert keeper.violations() == 0 and bool((replacement.weight[:, 0] == 0).all())
