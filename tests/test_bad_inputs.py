"""One regression test per root cause of issue 18 (bad input → a named error, or a checked correct result).

``tests/test_fuzz_inputs.py`` generates such inputs by the thousand; these are the
hand-written cases the issue lists, each asserting the error type and that the
message says what to change.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from fold_nets import FunctionalUse
from torch import nn

import mp_plugin as mp
from mp_plugin.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    DataError,
    InvalidWeightError,
    PatternError,
    PlanFormatError,
)
from mp_plugin.evaluation.models import load_model, register_builtin_model, save_pruned_checkpoint
from mp_plugin.masks.select import check_nm

torch.set_num_threads(1)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)).eval()


@register_builtin_model("bad_inputs_mlp")
def _bad_inputs_mlp() -> nn.Module:
    return mlp()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# 1. gram_dtype --------------------------------------------------------------------------------


def test_gram_dtype_names_and_bad_values() -> None:
    w = torch.randn(32, 48, dtype=torch.float64)
    by_name = mp.fit_marchenko_pastur(w, gram_dtype="float64")
    by_dtype = mp.fit_marchenko_pastur(w, gram_dtype=torch.float64)
    assert by_name.sigma == by_dtype.sigma
    for bad in ("bogus", torch.float16, torch.bfloat16, torch.int64):
        with pytest.raises(ConfigError, match="gram_dtype"):
            mp.fit_marchenko_pastur(w, gram_dtype=bad)
    with pytest.raises(ConfigError, match="gram_dtype"):
        mp.PlanConfig(gram_dtype="bogus")
    assert mp.PlanConfig(gram_dtype=torch.float32).gram_dtype == "float32"


# 2. huge weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [400, -600, 100])
def test_huge_and_tiny_weights_fit_exactly(exponent: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(40, 64, dtype=torch.float64)
    ref = mp.fit_marchenko_pastur(w)
    scaled = mp.fit_marchenko_pastur(torch.ldexp(w, torch.tensor(float(exponent), dtype=torch.float64)))
    assert math.isclose(scaled.sigma, math.ldexp(ref.sigma, exponent), rel_tol=1e-9)
    assert math.isclose(scaled.sigma_plus, math.ldexp(ref.sigma_plus, exponent), rel_tol=1e-9)
    assert scaled.n_spikes == ref.n_spikes
    np.testing.assert_allclose(scaled.singular_values, np.ldexp(ref.singular_values, exponent), rtol=1e-9)


def test_weights_beyond_float64_squares_are_refused_by_name() -> None:
    w = torch.randn(16, 24, dtype=torch.float64) * 1e200
    with pytest.raises(InvalidWeightError, match="rescale"):
        mp.fit_marchenko_pastur(w)


# 3. calibration and example inputs -------------------------------------------------------------


def test_calibration_batch_failure_names_the_batch_and_the_expected_input() -> None:
    model = mlp()
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    before = state(model)
    good = torch.randn(4, 16)
    with pytest.raises(CalibrationError, match=r"calibration batch 1 .*\(\.\.\., 16\)"):
        mp.apply(model, p, calibration=[good, torch.randn(4, 15)], projection="cast")
    with pytest.raises(CalibrationError, match="unexpected keyword"):
        mp.apply(model, p, calibration={"pixel_values": good}, projection="cast")
    assert unchanged(model, before)


def test_numpy_calibration_is_accepted() -> None:
    x = torch.randn(8, 16)
    a, b = mlp(), mlp()
    pa, pb = mp.plan(a, 0.5, "2:4", "magnitude"), mp.plan(b, 0.5, "2:4", "magnitude")
    mp.apply(a, pa, calibration=x, projection="cast")
    mp.apply(b, pb, calibration=x.numpy().astype(np.float64), projection="cast")
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


# 4. meta device --------------------------------------------------------------------------------


def test_apply_refuses_meta_weights() -> None:
    p = mp.plan(mlp(), 0.5, "2:4", "magnitude")
    with torch.device("meta"):
        meta = mlp()
    with pytest.raises(InvalidWeightError, match="meta device"):
        mp.apply(meta, p)


# 5. plan files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        ("null", "JSON object"),
        ("[1, 2]", "JSON object"),
        ("", "empty"),
        ('{"schema_version": 1', "not valid JSON"),
    ],
)
def test_plan_load_names_the_file(tmp_path, content: str, match: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanFormatError, match=match) as info:
        mp.PrunePlan.load(path)
    assert str(path) in str(info.value)


def test_plan_load_binary_and_missing(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(PlanFormatError, match="UTF-8"):
        mp.PrunePlan.load(path)
    with pytest.raises(PlanFormatError, match="cannot be read"):
        mp.PrunePlan.load(tmp_path / "absent.json")


@pytest.mark.parametrize("value", ["7", 2.5, -3, 10**12, None, True])
def test_tampered_n_prune_is_refused(tmp_path, value) -> None:
    p = mp.plan(mlp(), 0.5, "unstructured", "magnitude")
    d = p.to_dict()
    d["layers"][0]["n_prune"] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanFormatError, match="n_prune"):
        mp.PrunePlan.load(path)
    p.layers[0].n_prune = value  # the same edit in Python
    with pytest.raises(PlanFormatError, match="n_prune"):
        mp.apply(mlp(), p)


def test_plan_missing_and_unknown_fields(tmp_path) -> None:
    d = mp.plan(mlp(), 0.5, "2:4", "magnitude").to_dict()
    missing = copy.deepcopy(d)
    missing["layers"][0].pop("weight_shape")
    unknown = copy.deepcopy(d)
    unknown["layers"][0]["colour"] = "red"
    for bad, match in ((missing, "lacks the field"), (unknown, "unknown field")):
        with pytest.raises(PlanFormatError, match=match):
            mp.PrunePlan.from_dict(bad)


# 6. checkpoints ---------------------------------------------------------------------------------


def test_load_model_bad_checkpoints(tmp_path) -> None:
    path = save_pruned_checkpoint(mlp(), tmp_path / "ok")
    raw = path.read_bytes()
    cases = {
        "random.safetensors": b"\x13" * 64,
        "truncated.safetensors": raw[: len(raw) // 2],
        "header.safetensors": raw[:8] + b"{" * 16 + raw[24:],
        "empty.pt": b"",
        "corrupt.pt": b"PK\x03\x04 not a zip",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_model("bad_inputs_mlp", checkpoint=tmp_path / name)
        assert name in str(info.value)
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model("bad_inputs_mlp", checkpoint=tmp_path / "other.pt")
    small = {k: v[:1] for k, v in mlp().state_dict().items()}
    torch.save(small, tmp_path / "sizes.pt")
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_model("bad_inputs_mlp", checkpoint=tmp_path / "sizes.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_model("bad_inputs_mlp", checkpoint=tmp_path / "ok")
    with pytest.raises(ConfigError, match="num_classes"):
        load_model("bad_inputs_mlp", num_classes=-5)


# 7. CLI-reachable library inputs ----------------------------------------------------------------


def test_images_and_output_paths(tmp_path) -> None:
    from mp_plugin.evaluation.photos import image_folder_batch

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        image_folder_batch(tmp_path / "imgs")
    with pytest.raises(DataError, match="image size"):
        image_folder_batch(tmp_path / "imgs", size=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="existing file"):
        save_pruned_checkpoint(mlp(), blocker)
    p = mp.plan(mlp(), 0.5, "2:4", "magnitude")
    with pytest.raises(ConfigError, match="existing file"):
        p.save(blocker / "plan.json")
    with pytest.raises(ConfigError, match="max_rows"):
        p.to_table(max_rows=-3)


# 8. torchao FqnToConfig -------------------------------------------------------------------------


def test_torchao_fqn_to_config_prunes_only_the_named_layer() -> None:
    quant = pytest.importorskip("torchao.quantization")
    from mp_plugin.integrations.torchao import MPSparsifier

    model = mlp()
    before = state(model)
    config = MPSparsifier(sparsity=0.5, pattern="2:4")
    quant.quantize_(model, quant.FqnToConfig({"2": config}), filter_fn=None)
    assert check_nm(model[2].weight, 2, 4) and not torch.equal(model[2].weight, before["2.weight"])
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[4].weight, before["4.weight"])


# 9. permutations verify or refuse ---------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("g", torch.rand(32) + 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


def _weight_norm_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


@pytest.mark.parametrize(
    "build, reason",
    [
        (FunctionalUse, "read directly"),
        (_weight_norm_model, "parametrized"),
        (lambda: nn.Sequential(nn.Linear(16, 32), Scale(), nn.Linear(32, 8)), "non-persistent"),
    ],
)
def test_permute_refuses_what_it_cannot_fold_exactly(build, reason: str) -> None:
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = model(x)
    record = mp.permute_channels(model, "2:4")
    assert any(reason in s.reason for s in record.report.skipped)
    reloaded = copy.deepcopy(original)
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5) and torch.allclose(reloaded(x), ref, atol=1e-5)


def test_permute_example_errors_are_named() -> None:
    model = mlp()
    with pytest.raises(CalibrationError, match="NaN"):
        mp.permute_channels(model, "2:4", example_input=torch.full((2, 16), float("nan")))
    with pytest.raises(CalibrationError, match="example input"):
        mp.permute_channels(model, "2:4", example_input=torch.randn(2, 15))
    with pytest.raises(ConfigError):
        mp.permute_channels(model, "2:4", method="bogus")


# 10–12. weight_norm, CAST calibration, NaN weights -----------------------------------------------


def test_apply_refuses_parametrized_layers() -> None:
    model = mlp()
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    torch.nn.utils.parametrizations.weight_norm(model[0])
    torch.nn.utils.parametrizations.weight_norm(model[2])
    before = state(model)
    with pytest.raises(InvalidWeightError, match="parametrized") as info:
        mp.apply(model, p)
    assert "share one weight" not in str(info.value)
    assert unchanged(model, before)


def test_cast_calibration_nan_and_empty() -> None:
    model = mlp()
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    with pytest.raises(CalibrationError, match="NaN"):
        mp.apply(model, p, calibration=torch.full((4, 16), float("nan")), projection="cast")
    with pytest.raises(CalibrationError, match="empty"):
        mp.apply(model, p, calibration=[], projection="cast")


def test_nan_weights_on_the_cast_path() -> None:
    model = mlp()
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightError, match="NaN"):
        mp.apply(model, p, calibration=torch.randn(4, 16), projection="cast")


# 13. arguments that were ignored ------------------------------------------------------------------


def test_ignored_arguments_are_refused() -> None:
    model = mlp()
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    for alpha in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="prior_alpha"):
            mp.apply(model, p, prior_alpha=alpha)
    with pytest.raises(ConfigError, match="edge_compat"):
        mp.fit_marchenko_pastur(torch.randn(8, 8), edge_compat="author")
    with pytest.raises(ConfigError, match="edge_compat"):
        mp.PlanConfig(edge_compat="author")
    with pytest.raises(InvalidWeightError, match="complex"):
        mp.fit_marchenko_pastur(torch.randn(8, 8, dtype=torch.complex64))
    with pytest.raises(ConfigError, match="permute"):
        mp.apply(model, p, permute="swapp")


# 14. dtype round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_checkpoint_round_trip_keeps_dtype(tmp_path, dtype) -> None:
    model = mlp()
    mp.apply(model, mp.plan(model, 0.5, "2:4", "magnitude"))
    model = model.to(dtype)
    loaded = load_model("bad_inputs_mlp", checkpoint=save_pruned_checkpoint(model, tmp_path))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and v2.dtype == v.dtype and torch.equal(v, v2)


def test_a_checkpoint_saved_without_a_plan_drops_an_older_plan_json(tmp_path) -> None:
    from safetensors import safe_open

    model = mlp()
    p = mp.plan(model, 0.5, "2:4", "magnitude")
    mp.apply(model, p)
    save_pruned_checkpoint(model, tmp_path, plan=p)
    assert (tmp_path / "plan.json").exists()
    path = save_pruned_checkpoint(mlp(), tmp_path)  # another model, no plan: the old plan must not describe it
    assert not (tmp_path / "plan.json").exists()
    with safe_open(str(path), "pt") as f:
        assert "mp_plugin_plan" not in (f.metadata() or {})


# confusing messages --------------------------------------------------------------------------------


def test_messages_name_what_the_user_wrote() -> None:
    with pytest.raises(PatternError) as info:
        mp.plan(mlp(), 0.5, None)
    assert "dense" not in str(info.value) and "None" in str(info.value)
    with pytest.raises(ConfigError, match="projection"):
        mp.plan(mlp(), 0.5, "2:4", "cast")
