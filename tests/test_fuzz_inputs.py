"""Generated-input tests (issue 18): bad input gives a named error, good input a checked result.

Each test draws inputs as a careless or hostile user would (wrong dtypes and
shapes, NaN, huge and tiny magnitudes, tampered plans, corrupt files, invalid
options) and classifies every outcome:

* a *correct result*, checked here: exact sparsity counts, the k:n pattern holds,
  no NaN introduced, the model untouched where promised (by ``plan``, on every
  error), the function kept by permutations (and after a state_dict reload),
  plan and checkpoint round trips bit-exact and dtype-exact; or
* a *named error*: a :class:`mp_plugin.MPPluginError` with a message.

Anything else (a foreign exception from torch, pickle or safetensors, or a
result that fails its check) fails the test, and hypothesis prints the input.

Runs are seeded (``derandomize=True``). CI runs a small number of examples per
family; ``MP_FUZZ_FULL=1`` runs the full set (≥ 1,000 cases in total), and
``MP_FUZZ_REPORT=path.json`` writes the outcome counts per family::

    MP_FUZZ_FULL=1 MP_FUZZ_REPORT=fuzz.json python -m pytest -q tests/test_fuzz_inputs.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fold_nets import FunctionalUse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mp_plugin as mp
from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.models import load_model, register_builtin_model, save_pruned_checkpoint
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.counts import prune_target
from mp_plugin.masks.select import check_nm

torch.set_num_threads(1)

FULL = os.environ.get("MP_FUZZ_FULL") == "1"
OUTCOMES: Counter = Counter()


def fuzz(full: int, ci: int):
    """Hypothesis settings: seeded, no deadline, ``full`` examples with MP_FUZZ_FULL=1 else ``ci``."""
    return settings(
        max_examples=full if FULL else ci,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def classify(family: str, run) -> MPPluginError | None:
    """Run ``run`` (which checks its own result); record "correct" or the named error, re-raise anything else."""
    try:
        run()
    except MPPluginError as exc:
        message = str(exc)
        assert len(message) >= 15, f"{type(exc).__name__} with an unhelpful message: {message!r}"
        OUTCOMES[(family, f"named {type(exc).__name__}")] += 1
        return exc
    OUTCOMES[(family, "correct")] += 1
    return None


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("MP_FUZZ_REPORT")
    table: dict[str, dict[str, int]] = {}
    for (family, outcome), count in sorted(OUTCOMES.items()):
        table.setdefault(family, {})[outcome] = count
    total = sum(OUTCOMES.values())
    summary = {"total_cases": total, "full": FULL, "families": table}
    print("\nfuzz outcomes:", json.dumps(summary, indent=1))
    if path:
        Path(path).write_text(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------- models


def make_model(arch: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A small model of kind ``arch`` and a matching input (seeded)."""
    torch.manual_seed(seed)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
        x = torch.randn(6, 16)
    elif arch == "mlp_odd":  # one layer whose input width is not divisible by 4
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
        x = torch.randn(6, 10)
    elif arch == "conv1d":  # Conv1d with a grouped conv in the middle
        model = nn.Sequential(
            nn.Conv1d(4, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=1, groups=4),
            nn.ReLU(),
            nn.Conv1d(16, 8, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        x = torch.randn(3, 4, 12)
    elif arch == "tied":  # two modules sharing one weight
        first, second = nn.Linear(32, 32), nn.Linear(32, 32)
        second.weight = first.weight
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), first, nn.ReLU(), second, nn.ReLU(), nn.Linear(32, 4))
        x = torch.randn(6, 16)
    else:  # cnn
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
        )
        x = torch.randn(3, 3, 8, 8)
    return model.eval(), x


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values and dtype (NaN equals NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.equal(
            torch.view_as_real(a) if a.is_complex() else a.nan_to_num(7.0),
            torch.view_as_real(b) if b.is_complex() else b.nan_to_num(7.0),
        ) and torch.equal(a.isnan(), b.isnan())
    return torch.equal(a, b)


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before), "state_dict keys changed"
    for k, v in before.items():
        if v.is_meta:
            continue
        assert same(after[k], v), f"{k} changed although promised untouched"


def check_pruned(model: nn.Module, plan, before: dict[str, torch.Tensor], permuted: bool) -> None:
    """The checks of a correct ``apply``: counts, pattern, no NaN, kept values and other tensors unchanged."""
    modules = dict(model.named_modules())
    planned = set()
    for lp in plan.layers:
        w = modules[lp.name].weight.detach()
        planned.add(f"{lp.name}.weight")
        old = before[f"{lp.name}.weight"]
        assert torch.isfinite(w[torch.isfinite(old)]).all(), f"{lp.name}: NaN/Inf introduced by pruning"
        pat = Pattern.parse(lp.pattern)
        if pat.kind == "dense":
            if not permuted:
                assert same(w, old), f"{lp.name}: dense layer changed"
            continue
        if pat.is_kn:
            assert check_nm(w, pat.k, pat.n), f"{lp.name}: {pat} violated"
        elif int((old == 0).sum()) == 0:
            assert int((w == 0).sum()) == lp.n_prune, f"{lp.name}: {int((w == 0).sum())} zeros, plan says {lp.n_prune}"
        if not permuted:
            kept = w != 0
            assert torch.equal(w[kept], old[kept].to(w.dtype)), f"{lp.name}: kept weights changed"
    if not permuted:
        pointers = {modules[lp.name].weight.data_ptr() for lp in plan.layers}
        for k, v in model.state_dict().items():
            if k not in planned and v.data_ptr() not in pointers:  # tied copies of a planned weight are planned
                assert same(v, before[k]), f"{k} changed although it is not a planned weight"


def function_kept(model: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(x)
    tol = 1e-4 * (1.0 + float(reference.abs().max()))
    assert float((out - reference).abs().max()) <= tol, "the model's function changed"


# --------------------------------------------------------------------------- 1: spectrum

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.complex64]
GRAMS = ["float64", "float32", torch.float64, torch.float32, "double", torch.float16, torch.bfloat16, "bogus", 3]


SPECTRUM_FAULTS = ["dtype", "gram", "alpha", "beta", "estimator", "edge", "nan", "inf", "meta", "1d", "huge"]
MAX_EXPONENT = {torch.float64: 1000, torch.float32: 120, torch.bfloat16: 120, torch.float16: 14}


@fuzz(full=300, ci=100)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    kernel=st.sampled_from([(), (1,), (2, 2)]),
    fault=st.sampled_from(["none"] * 10 + SPECTRUM_FAULTS),
    dtype=st.sampled_from([torch.float64, torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    exponent=st.one_of(st.integers(-8, 8), st.integers(-1000, 1000)),
    special=st.sampled_from(["random", "random", "zeros", "rank1"]),
    gram=st.sampled_from(["float64", "float32", torch.float64, torch.float32, "double", "torch.float32"]),
    alpha=st.floats(0.0, 0.49),
    beta=st.floats(0.01, 0.99),
    estimator=st.sampled_from(["bema-debiased", "bema"]),
    edge=st.sampled_from(["correct", "authors"]),
    bad=st.sampled_from(
        [
            torch.int64,
            torch.complex64,
            torch.float16,
            torch.bfloat16,
            "bogus",
            3,
            None,
            -0.1,
            0.5,
            float("nan"),
            1.0,
            "author",
            True,
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_fuzz_spectrum(
    rows, cols, kernel, fault, dtype, exponent, special, gram, alpha, beta, estimator, edge, bad, seed
):
    limit = MAX_EXPONENT[dtype]
    exponent = max(-limit, min(limit, exponent)) if fault != "huge" else 2000
    if fault == "dtype":
        dtype = bad if bad in (torch.int64, torch.complex64) else torch.int64
    gram = bad if fault == "gram" else gram
    alpha = bad if fault == "alpha" else alpha
    beta = bad if fault == "beta" else beta
    estimator = bad if fault == "estimator" else estimator
    edge = bad if fault == "edge" else edge
    special = fault if fault in ("nan", "inf", "meta", "1d") else special

    def run() -> None:
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(rows, cols, *kernel, dtype=torch.float64, generator=gen)
        if special == "rank1":
            base = torch.randn(rows, 1, dtype=torch.float64, generator=gen) @ torch.randn(
                1, base[0].numel(), dtype=torch.float64, generator=gen
            )
            base = base.reshape(rows, cols, *kernel)
        w = torch.ldexp(base, torch.tensor(float(exponent), dtype=torch.float64))
        if special == "nan":
            w.view(-1)[seed % w.numel()] = float("nan")
        elif special == "inf":
            w.view(-1)[seed % w.numel()] = float("inf")
        elif special == "zeros":
            w.zero_()
        elif special == "1d":
            w = w.reshape(-1)
        w = w.to(dtype) if dtype != torch.int64 else w.clamp(-1e6, 1e6).nan_to_num().to(dtype)
        if special == "meta":
            w = w.to("meta")
        fit = mp.fit_marchenko_pastur(w, alpha=alpha, beta=beta, estimator=estimator, edge_compat=edge, gram_dtype=gram)
        mat = w.to(torch.float64).reshape(rows, -1)
        p = min(mat.shape)
        ref = torch.linalg.svdvals(mat).numpy()
        assert fit.singular_values.shape == (p,)
        assert np.isfinite(fit.singular_values).all() and np.isfinite([fit.sigma, fit.sigma_plus]).all()
        scale = float(ref.max()) if ref.size else 0.0
        err = np.abs(fit.singular_values - ref).max()
        assert err <= 3e-3 * scale + 1e-300, f"singular values off by {err:.3g} (max {scale:.3g})"
        assert fit.sigma >= 0 and fit.sigma_plus >= 0 and 0 <= fit.n_spikes <= p
        assert 0.0 <= fit.bulk_fraction <= 1.0

    classify("spectrum (fit_marchenko_pastur)", run)


# --------------------------------------------------------------------------- 2: plan

PATTERNS = [
    "unstructured",
    "2:4",
    "4:8",
    "auto",
    "dense",
    "none",
    None,
    "2:3",
    "0:4",
    "5:4",
    "2:32",
    "bogus",
    4,
    "12:16",
    " 2 : 4 ",
]


@fuzz(full=150, ci=50)
@given(
    arch=st.sampled_from(["mlp", "mlp_odd", "cnn", "conv1d", "tied"]),
    fault=st.sampled_from(["none"] * 5 + ["sparsity", "pattern", "budget", "gram", "alpha"]),
    sparsity=st.floats(0.0, 0.95),
    pattern=st.sampled_from(["unstructured", "2:4", "4:8", "auto", "12:16", " 2 : 4 ", "1:2"]),
    budget=st.sampled_from(["seb", "seb-hill", "magnitude", "uniform"]),
    gram=st.sampled_from(["float64", "float32", torch.float32]),
    alpha=st.floats(0.0, 0.49),
    exponent=st.sampled_from([0] * 6 + [-600, -100, 100, 400]),
    bad=st.sampled_from(
        [
            -0.1,
            1.0,
            1.5,
            float("nan"),
            float("inf"),
            "0.5",
            None,
            True,
            "dense",
            "none",
            "2:3x",
            "0:4",
            "5:4",
            "2:32",
            "bogus",
            4,
            "cast",
            torch.float16,
            0.6,
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_fuzz_plan(arch, fault, sparsity, pattern, budget, gram, alpha, exponent, bad, seed):
    sparsity = bad if fault == "sparsity" else sparsity
    pattern = bad if fault == "pattern" else pattern
    budget = bad if fault == "budget" else budget
    gram = bad if fault == "gram" else gram
    alpha = bad if fault == "alpha" else alpha
    model, _ = make_model(arch, seed)
    unscaled = copy.deepcopy(model).double()
    if exponent:  # a float64 model scaled by 2^e: the plan must be the unscaled model's (scale-free budgets)
        model = model.double()
        with torch.no_grad():
            for t in model.parameters():
                t.copy_(torch.ldexp(t, torch.tensor(float(exponent), dtype=torch.float64)))
    before = snapshot(model)

    def run() -> None:
        cfg = mp.PlanConfig(gram_dtype=gram, alpha=alpha)
        p = mp.plan(model, sparsity, pattern, budget, cfg)
        assert_untouched(model, before)
        total = sum(lp.numel for lp in p.layers)
        assert sum(lp.n_prune for lp in p.layers) == prune_target(float(sparsity), total)
        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if hasattr(m, "weight")}
        for lp in p.layers:
            assert 0 <= lp.n_prune <= lp.numel and tuple(lp.weight_shape) == shapes[lp.name]
            assert Pattern.parse(lp.pattern).eligible(tuple(lp.weight_shape))
        with tempfile.TemporaryDirectory() as tmp:
            back = mp.PrunePlan.load(p.save(Path(tmp) / "plan.json"))
        assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(p.to_dict(), sort_keys=True)
        if exponent:
            ref = mp.plan(unscaled, sparsity, pattern, budget, cfg)
            assert [(lp.n_prune, lp.pattern) for lp in p.layers] == [(lp.n_prune, lp.pattern) for lp in ref.layers]

    classify("plan", run)
    assert_untouched(model, before)


# --------------------------------------------------------------------------- 3: apply

CALIBRATION = [
    "none",
    "good",
    "good_list",
    "numpy",
    "wrong_shape",
    "int",
    "nan",
    "empty",
    "dict_bad",
    "string",
    "list_bad",
    "tuple",
]


def calibration_of(kind: str, x: torch.Tensor) -> Any:
    return {
        "none": None,
        "good": x,
        "good_list": [x[: len(x) // 2], x[len(x) // 2 :]],
        "numpy": x.numpy().astype(np.float64),
        "wrong_shape": x[..., :-1],
        "int": x.long(),
        "nan": torch.full_like(x, float("nan")),
        "empty": [],
        "dict_bad": {"pixel_values": x},
        "string": "images/",
        "list_bad": [x, 3],
        "tuple": (x,),
    }[kind]


def tamper(plan, how: str, value: Any, model: nn.Module) -> None:
    lp = plan.layers[0]
    if how == "n_prune":
        lp.n_prune = value
    elif how == "pattern":
        lp.pattern = value
    elif how == "weight_shape":
        lp.weight_shape = (lp.weight_shape[0] + 1, *lp.weight_shape[1:])
    elif how == "name":
        lp.name = "no.such.layer"
    elif how == "duplicate":
        plan.layers.append(copy.deepcopy(lp))
    elif how == "nan_weight":
        with torch.no_grad():
            model.get_submodule(lp.name).weight.view(-1)[0] = float("nan")
    elif how == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model.get_submodule(lp.name))
    elif how == "two_weight_norms":
        for other in plan.layers[:2]:
            torch.nn.utils.parametrizations.weight_norm(model.get_submodule(other.name))
    elif how == "old_weight_norm":
        torch.nn.utils.weight_norm(model.get_submodule(lp.name))
    elif how == "complex":
        mod = model.get_submodule(lp.name)
        mod.weight = nn.Parameter(mod.weight.detach().to(torch.complex64))
    elif how == "meta":
        mod = model.get_submodule(lp.name)
        mod.weight = nn.Parameter(torch.empty_like(mod.weight, device="meta"))


APPLY_FAULTS = [
    "projection",
    "calib",
    "prior_alpha",
    "permute",
    "n_prune",
    "pattern",
    "weight_shape",
    "name",
    "duplicate",
    "nan_weight",
    "weight_norm",
    "two_weight_norms",
    "old_weight_norm",
    "complex",
    "meta",
]


@fuzz(full=300, ci=100)
@given(
    arch=st.sampled_from(["mlp", "mlp_odd", "cnn", "conv1d", "tied"]),
    fault=st.sampled_from(["none"] * 12 + APPLY_FAULTS),
    sparsity=st.floats(0.1, 0.9),
    pattern=st.sampled_from(["unstructured", "2:4", "4:8", "auto", "1:2"]),
    projection=st.sampled_from(["magnitude", "magnitude", "cast", "cast", "obs"]),
    restore=st.sampled_from([False] * 5 + [True]),
    dtype=st.sampled_from([torch.float32] * 5 + [torch.float64, torch.bfloat16]),
    calib=st.sampled_from(["good", "good_list", "numpy", "tuple"]),
    bad_calib=st.sampled_from(["none", "wrong_shape", "int", "nan", "empty", "dict_bad", "string", "list_bad"]),
    prior_alpha=st.sampled_from([0.0, 0.0, 0.5, 2]),
    permute=st.sampled_from([False, False, "swap", "interleave", True, None, "none"]),
    value=st.sampled_from(["5", 3.5, -1, 10**9, None, True, "2:3", "bogus", "2:32", "auto", -0.5, float("nan"), "x"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_apply(
    arch, fault, sparsity, pattern, projection, restore, dtype, calib, bad_calib, prior_alpha, permute, value, seed
):
    model, x = make_model(arch, seed)
    model = model.to(dtype)
    p = mp.plan(model, sparsity, pattern, "magnitude")
    projection = value if fault == "projection" else projection
    prior_alpha = value if fault == "prior_alpha" else prior_alpha
    permute = value if fault == "permute" else permute
    calib = bad_calib if fault == "calib" else calib
    if fault in APPLY_FAULTS[4:]:
        tamper(p, fault, value, model)
    before = snapshot(model)
    calibration = calibration_of(calib, x)

    def run() -> None:
        mp.apply(
            model,
            p,
            calibration=calibration,
            projection=projection,
            prior_alpha=prior_alpha,
            permute=permute,
            restore=restore,
        )
        # restore and OBS re-solve the kept weights: their values are new, counts and pattern are checked
        changed = permute not in (False, None, "none") or restore or projection == "obs"
        check_pruned(model, p, before, permuted=changed)

    if classify("apply", run) is not None:
        assert_untouched(model, before)


# --------------------------------------------------------------------------- 4: permute_channels


class NonPersistentScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("g", torch.rand(c) + 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


class Untraceable(nn.Module):
    """Data-dependent control flow: only the child traces; the parent reads a child weight."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blk(x)
        if x.sum() > -1e9:
            out = out + (x[:, :1] @ self.blk[2].weight[:1, :4]).sum()
        return out


def permute_model(arch: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if arch in ("mlp", "cnn", "conv1d", "tied"):
        return make_model(arch, seed)
    x = torch.randn(5, 16)
    if arch == "functional":
        return FunctionalUse().eval(), x
    if arch == "weight_norm":
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        torch.nn.utils.parametrizations.weight_norm(model[0])
        return model.eval(), x
    if arch == "nonpersistent":
        return nn.Sequential(nn.Linear(16, 32), NonPersistentScale(32), nn.Linear(32, 8)).eval(), x
    return Untraceable().eval(), x


@fuzz(full=150, ci=50)
@given(
    arch=st.sampled_from(
        ["mlp", "mlp", "cnn", "cnn", "conv1d", "tied", "functional", "weight_norm", "nonpersistent", "untraceable"]
    ),
    fault=st.sampled_from(["none"] * 6 + ["example", "pattern", "method", "importance"]),
    example=st.sampled_from(["none", "good", "numpy", "list"]),
    bad_example=st.sampled_from(["wrong_shape", "nan", "int"]),
    pattern=st.sampled_from(["2:4", "4:8", "1:2", "2:8"]),
    method=st.sampled_from(["swap", "interleave"]),
    importance=st.sampled_from(["weight", "weight", "activation"]),
    bad=st.sampled_from(["unstructured", "bogus", "2:32", "dense", None, 3]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_permute(arch, fault, example, bad_example, pattern, method, importance, bad, seed):
    example = bad_example if fault == "example" else example
    pattern = bad if fault == "pattern" else pattern
    method = bad if fault == "method" else method
    importance = bad if fault == "importance" else importance
    if importance == "activation" and example == "none":
        example = "good"
    model, x = permute_model(arch, seed)
    original = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(x)
    ex = {
        "none": None,
        "good": x,
        "numpy": x.numpy(),
        "wrong_shape": x[..., :-1],
        "nan": torch.full_like(x, float("nan")),
        "int": x.long(),
        "list": [x],
    }[example]

    def run() -> None:
        mp.permute_channels(model, pattern, method, example_input=ex, importance=importance, max_seconds_per_layer=0.5)
        function_kept(model, reference, x)
        reloaded = copy.deepcopy(original)
        reloaded.load_state_dict(model.state_dict())
        function_kept(reloaded, reference, x)  # non-persistent state was not permuted

    classify("permute_channels", run)
    function_kept(model, reference, x)  # errors restore the model


# --------------------------------------------------------------------------- 5: plan files

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
TOP_KEYS = ["schema_version", "sparsity", "pattern", "method", "layers", "config", "applied", "skipped", "model_name"]
LAYER_KEYS = [
    "name",
    "kind",
    "layer_type",
    "shape",
    "weight_shape",
    "numel",
    "fit",
    "z",
    "w",
    "unstructured_budget",
    "n_prune",
    "pattern",
    "sparsity",
    "note",
]


@fuzz(full=220, ci=70)
@given(
    arch=st.sampled_from(["mlp", "cnn"]),
    pattern=st.sampled_from(["unstructured", "2:4"]),
    how=st.sampled_from(
        [
            "roundtrip",
            "roundtrip",
            "roundtrip",
            "truncate",
            "bytes",
            "empty",
            "null",
            "list",
            "drop_top",
            "drop_layer",
            "set_top",
            "set_layer",
            "unknown",
            "missing",
            "directory",
            "n_prune",
        ]
    ),
    key_index=st.integers(0, 20),
    value=JSON_VALUES,
    cut=st.floats(0.0, 1.0),
    blob=st.binary(min_size=1, max_size=64),
    seed=st.integers(0, 2**16),
)
def test_fuzz_plan_file(arch, pattern, how, key_index, value, cut, blob, seed):
    model, _ = make_model(arch, seed)
    p = mp.plan(model, 0.5, pattern, "magnitude")
    before = snapshot(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = p.save(Path(tmp) / "plan.json")
        text = path.read_text()
        d = json.loads(text)
        top, lkey = TOP_KEYS[key_index % len(TOP_KEYS)], LAYER_KEYS[key_index % len(LAYER_KEYS)]
        if how == "truncate":
            path.write_text(text[: int(cut * (len(text) - 1))])
        elif how == "bytes":
            path.write_bytes(blob)
        elif how == "empty":
            path.write_text("")
        elif how in ("null", "list"):
            path.write_text("null" if how == "null" else "[1, 2]")
        elif how == "drop_top":
            d.pop(top)
        elif how == "drop_layer":
            d["layers"][0].pop(lkey)
        elif how == "set_top":
            d[top] = value
        elif how == "set_layer":
            d["layers"][0][lkey] = value
        elif how == "unknown":
            d["layers"][0]["extra"] = value
        elif how == "n_prune":
            d["layers"][0]["n_prune"] = [-3, 2.5, "7", 10**12, None][key_index % 5]
        elif how == "missing":
            path = Path(tmp) / "nope.json"
        elif how == "directory":
            path = Path(tmp)
        if how in ("drop_top", "drop_layer", "set_top", "set_layer", "unknown", "n_prune"):
            path.write_text(json.dumps(d))

        def run() -> None:
            back = mp.PrunePlan.load(path)
            if how == "roundtrip":
                assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(p.to_dict(), sort_keys=True)
            mp.apply(model, back)
            check_pruned(model, back, before, permuted=False)

        if classify("plan files (PrunePlan.load → apply)", run) is not None:
            assert_untouched(model, before)


# --------------------------------------------------------------------------- 6: checkpoints


@register_builtin_model("fuzz_mlp")
def _fuzz_mlp() -> nn.Module:
    return make_model("mlp", 0)[0]


@register_builtin_model("fuzz_cnn")
def _fuzz_cnn() -> nn.Module:
    return make_model("cnn", 0)[0]


@fuzz(full=160, ci=50)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    prune=st.booleans(),
    how=st.sampled_from(
        [
            "none",
            "none",
            "none",
            "none",
            "truncate",
            "header",
            "bytes",
            "empty",
            "directory",
            "other_arch",
            "pt_state",
            "pt_truncated",
            "pt_module",
            "missing",
            "not_tensor",
            "wrong_name",
        ]
    ),
    cut=st.floats(0.0, 0.999),
    pos=st.integers(0, 10**6),
    byte=st.integers(0, 255),
    blob=st.binary(min_size=1, max_size=64),
    seed=st.integers(0, 2**16),
)
def test_fuzz_checkpoint(dtype, prune, how, cut, pos, byte, blob, seed):
    model, _ = make_model("mlp", seed)
    if prune:
        mp.apply(model, mp.plan(model, 0.5, "2:4", "magnitude"))
    model = model.to(dtype)
    saved = snapshot(model)
    name = "fuzz_mlp"
    with tempfile.TemporaryDirectory() as tmp:
        path = save_pruned_checkpoint(model, Path(tmp) / "out")
        raw = path.read_bytes()
        if how == "truncate":
            path.write_bytes(raw[: int(cut * len(raw))])
        elif how == "header":
            header_len = int.from_bytes(raw[:8], "little")
            at = pos % (8 + header_len)
            path.write_bytes(raw[:at] + bytes([byte]) + raw[at + 1 :])
        elif how == "bytes":
            path.write_bytes(blob)
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "directory":
            path = path.parent
        elif how == "other_arch":
            name = "fuzz_cnn"
        elif how == "wrong_name":
            name = "no_such_model_anywhere"
        elif how.startswith("pt_") or how == "not_tensor":
            pt = Path(tmp) / "model.pt"
            obj: Any = model if how == "pt_module" else model.state_dict()
            if how == "not_tensor":
                obj = {**model.state_dict(), "epoch": 3}
            torch.save(obj, pt)
            if how == "pt_truncated":
                pt.write_bytes(pt.read_bytes()[: int(cut * pt.stat().st_size)])
            path = pt
        elif how == "missing":
            path = Path(tmp) / "absent.safetensors"

        def run() -> None:
            loaded = load_model(name, checkpoint=path)
            state = loaded.state_dict()
            assert set(state) == set(saved)
            for k, v in saved.items():
                assert state[k].dtype == v.dtype, f"{k}: dtype {state[k].dtype}, saved {v.dtype}"
                assert torch.equal(state[k], v), f"{k}: values differ from the saved checkpoint"

        classify("checkpoints (save_pruned_checkpoint → load_model)", run)


# --------------------------------------------------------------------------- 7: certify


@fuzz(full=80, ci=25)
@given(
    fault=st.sampled_from(["none"] * 3 + ["batch", "labels", "mode"]),
    batch=st.sampled_from(["good"]),
    bad_batch=st.sampled_from(["numpy", "wrong_shape", "nan", "empty", "dict", "int"]),
    labels=st.sampled_from(["none", "good"]),
    bad_labels=st.sampled_from(["short", "float", "out_of_range"]),
    mode=st.sampled_from(["empirical", "empirical", "bound", "jacobian"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_certify(fault, batch, bad_batch, labels, bad_labels, mode, seed):
    batch = bad_batch if fault == "batch" else batch
    labels = bad_labels if fault == "labels" else labels
    mode = "bogus" if fault == "mode" else mode
    dense, x = make_model("mlp", seed)
    pruned = copy.deepcopy(dense)
    mp.apply(pruned, mp.plan(pruned, 0.5, "2:4", "magnitude"))
    before_dense, before_pruned = snapshot(dense), snapshot(pruned)
    xb = {
        "good": x,
        "numpy": x.numpy(),
        "wrong_shape": x[:, :-1],
        "nan": torch.full_like(x, float("nan")),
        "empty": x[:0],
        "dict": {"pixel_values": x},
        "int": x.long(),
    }[batch]
    n = x.shape[0]
    lab = {
        "none": None,
        "good": torch.randint(0, 5, (n,)),
        "short": torch.randint(0, 5, (n - 1,)),
        "float": torch.rand(n),
        "out_of_range": torch.full((n,), 99),
    }[labels]

    def run() -> None:
        cert = mp.certify(dense, pruned, xb, labels=lab, mode=mode, gaussian=False)
        assert len(cert.preserved) == n and len(cert.pred_dense) == n and np.isfinite(cert.eta).all()
        with torch.no_grad():
            assert np.array_equal(cert.pred_dense, dense(x).argmax(-1).numpy())
            assert np.array_equal(cert.pred_pruned, pruned(x).argmax(-1).numpy())

    classify("certify", run)
    assert_untouched(dense, before_dense)
    assert_untouched(pruned, before_pruned)


# --------------------------------------------------------------------------- 8: torchao route


@fuzz(full=80, ci=25)
@given(
    chosen=st.sets(
        st.sampled_from(["0", "2", "4", "0.weight", "2.bias", "re:[02]", "_default", "re:.*", "re:.*weight"]),
        min_size=1,
        max_size=3,
    ),
    fault=st.sampled_from(["none"] * 4 + ["projection", "budget", "calib"]),
    projection=st.sampled_from(["magnitude", "magnitude", "cast"]),
    budget=st.sampled_from(["seb", "magnitude"]),
    calib=st.sampled_from(["good", "numpy"]),
    bad=st.sampled_from(["bogus", "none", "wrong_shape", "nan"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_torchao(chosen, fault, projection, budget, calib, bad, seed):
    projection = bad if fault == "projection" else projection
    budget = bad if fault == "budget" else budget
    calib = (bad if bad != "bogus" else "string") if fault == "calib" else calib
    torchao_quant = pytest.importorskip("torchao.quantization")
    from mp_plugin.integrations.torchao import MPSparsifier

    model, x = make_model("mlp", seed)
    before = snapshot(model)
    calibration = calibration_of(calib, x)

    def run() -> None:
        config = MPSparsifier(
            sparsity=0.5, pattern="2:4", budget=budget, projection=projection, calibration=calibration
        )
        mapping = dict.fromkeys(sorted(chosen), config)
        torchao_quant.quantize_(model, torchao_quant.FqnToConfig(mapping), filter_fn=None)
        the_plan = config.plan_for(model)
        assert the_plan is not None
        names = {lp.name for lp in the_plan.layers}
        assert all(resolved(n) for n in names), f"planned layers {names} outside the FqnToConfig {sorted(chosen)}"
        for mod_name in ("0", "2", "4"):
            w = model.get_submodule(mod_name).weight.detach()
            if mod_name in names:
                assert check_nm(w, 2, 4)
            else:
                assert torch.equal(w, before[f"{mod_name}.weight"]), f"layer {mod_name} pruned although not named"

    mapping = dict.fromkeys(sorted(chosen))  # the keys; run() maps them to its config

    def resolved(name: str) -> bool:  # torchao's order for the weight: exact names, full-match regexes, _default
        import re

        for exact in (f"{name}.weight", name):
            if exact in mapping:
                return True
        for target in (f"{name}.weight", name):
            if any(k.startswith("re:") and re.fullmatch(k[3:], target) for k in mapping):
                return True
        return "_default" in mapping

    if classify("torchao FqnToConfig", run) is not None:
        assert_untouched(model, before)


# --------------------------------------------------------------------------- 8b: token batches


class TinyEncoder(nn.Module):
    """Token ids and an attention mask in, (B, 3) logits out, like a Hugging Face encoder with a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.ff(h)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1.0))


TOKEN_BATCHES = [
    "good",
    "good",
    "good_list",
    "padded",
    "zero_mask",
    "mask_shape",
    "ids_range",
    "float_ids",
    "no_mask",
    "extra_key",
    "numpy_ids",
    "empty",
]


@fuzz(full=80, ci=20)
@given(
    batch=st.sampled_from(TOKEN_BATCHES),
    projection=st.sampled_from(["magnitude", "cast", "cast"]),
    permute=st.sampled_from([False, False, "swap"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_token_batches(batch, projection, permute, seed):
    torch.manual_seed(seed)
    model = TinyEncoder().eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    data: Any = {
        "good": {"input_ids": ids, "attention_mask": mask},
        "good_list": [
            {"input_ids": ids[:2], "attention_mask": mask[:2]},
            {"input_ids": ids[2:], "attention_mask": mask[2:]},
        ],
        "padded": {"input_ids": ids, "attention_mask": torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), 1)},
        "zero_mask": {"input_ids": ids, "attention_mask": torch.zeros_like(mask)},
        "mask_shape": {"input_ids": ids, "attention_mask": mask[:, :4]},
        "ids_range": {"input_ids": ids + 100, "attention_mask": mask},
        "float_ids": {"input_ids": ids.float(), "attention_mask": mask},
        "no_mask": {"input_ids": ids},
        "extra_key": {"input_ids": ids, "attention_mask": mask, "token_type_ids": ids * 0},
        "numpy_ids": {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
        "empty": {"input_ids": ids[:0], "attention_mask": mask[:0]},
    }[batch]
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    before = snapshot(model)

    def run() -> None:
        mp.apply(model, p, calibration=data, projection=projection, permute=permute)
        check_pruned(model, p, before, permuted=permute is not False)
        if projection == "cast":
            methods = {e["method"] for e in p.applied["layers"].values()}
            assert "cast" in methods, f"CAST requested but every layer fell back: {methods}"

    if classify("token batches (apply with CAST)", run) is not None:
        assert_untouched(model, before)


# --------------------------------------------------------------------------- 9: the CLI

CLI_FAULTS = ["threads", "out_file", "max_rows", "sparsity", "pattern", "budget", "checkpoint", "num_classes"]


@fuzz(full=60, ci=15)
@given(
    fault=st.sampled_from(["none"] * 4 + CLI_FAULTS),
    pattern=st.sampled_from(["unstructured", "2:4", "auto"]),
    budget=st.sampled_from(["seb", "magnitude", "uniform"]),
    sparsity=st.sampled_from(["0.3", "0.5", "0.7"]),
    bad=st.sampled_from(["-1", "0", "-3", "1.5", "nan", "abc", "2:32", "cast", "dense"]),
    blob=st.binary(min_size=0, max_size=40),
)
def test_fuzz_cli(capsys, fault, pattern, budget, sparsity, bad, blob):
    from mp_plugin.cli.main import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = ["prune", "fuzz_mlp", "--pattern", pattern, "--budget", budget, "--sparsity", sparsity]
        if fault == "threads":
            argv += ["--threads", bad]
        elif fault == "out_file":
            out.write_text("taken")
        elif fault == "max_rows":
            argv += ["--max-rows", bad]
        elif fault in ("sparsity", "pattern", "budget"):
            argv[argv.index(f"--{fault}") + 1] = bad
        elif fault == "checkpoint":
            ckpt = Path(tmp) / "bad.safetensors"
            ckpt.write_bytes(blob)
            argv += ["--checkpoint", str(ckpt)]
        elif fault == "num_classes":
            argv += ["--num-classes", bad]
        argv += ["--out", str(out)]

        def run() -> None:
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: a usage error names the option, exit 2
                err = capsys.readouterr().err
                assert exc.code == 2 and "error:" in err and "Traceback" not in err
                raise mp.ConfigError(f"usage error: {err.strip().splitlines()[-1]}") from None
            err = capsys.readouterr().err
            assert "Traceback" not in err
            if code != 0:
                lines = [line for line in err.splitlines() if line.startswith("mp-plugin prune: error:")]
                assert code == 2 and len(lines) == 1, f"exit {code} (1 = foreign exception): {err}"
                raise mp.MPPluginError(lines[0])
            back = mp.PrunePlan.load(out / "plan.json")
            loaded = load_model("fuzz_mlp", checkpoint=out / "model.safetensors")
            assert mp.sparsity_report(loaded, back).kn_valid
            zeros = sum(int((loaded.get_submodule(lp.name).weight == 0).sum()) for lp in back.layers)
            if back.pattern == "unstructured":
                assert zeros >= sum(lp.n_prune for lp in back.layers)

        classify("CLI (mp-plugin prune)", run)


def test_outcome_classifier_rejects_foreign_errors() -> None:
    """The classifier itself: a foreign exception is re-raised, not counted as a clean outcome."""
    with pytest.raises(ZeroDivisionError):
        classify("self-test", lambda: 1 / 0)
    err = classify("self-test", lambda: (_ for _ in ()).throw(mp.PatternError("pattern '2:3' is not what you want")))
    assert isinstance(err, mp.PatternError)
    OUTCOMES.pop(("self-test", "named PatternError"), None)
    assert math.isfinite(sum(OUTCOMES.values()))
