"""``mp-plugin prune``: the written checkpoint reloads to the pruned model, plan sidecar included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mp_plugin.budget.rules import DEFAULT_RESTORE_BUDGET
from mp_plugin.cli.main import main
from mp_plugin.evaluation.models import load_model
from mp_plugin.masks.select import check_nm
from mp_plugin.planning.build import PrunePlan


def _photo_dir(tmp_path: Path) -> Path:
    matplotlib = pytest.importorskip("matplotlib")
    folder = tmp_path / "images"
    folder.mkdir()
    src = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    shutil.copy(src, folder / "a.jpg")
    from PIL import Image

    Image.open(src).crop((50, 60, 350, 400)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_prune_cast_efficientnet_lite0_round_trip(efficientnet_lite0, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["prune", "efficientnet_lite0", "--pattern", "2:4", "--sparsity", "0.5", "--method", "seb"]
    args += ["--projection", "cast", "--data", str(_photo_dir(tmp_path)), "--image-size", "64"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "k:n valid: yes" in printed and "model.safetensors" in printed
    plan = PrunePlan.load(out / "plan.json")
    assert plan.applied["method"] == "cast"
    rows = plan.applied["calibration_rows"]
    assert set(rows) == {lp.name for lp in plan.layers if lp.pattern == "2:4"}
    assert all(0 < r <= 4096 for r in rows.values())  # 2 images, ≤ 4096 rows per layer
    model = load_model("efficientnet_lite0", checkpoint=out / "model.safetensors")
    modules = plan.check_model(model)
    for lp in plan.layers:
        w = modules[lp.name].weight
        if lp.pattern == "2:4":
            assert check_nm(w, 2, 4), lp.name
    dense = dict(efficientnet_lite0.named_modules())
    changed = [lp.name for lp in plan.layers if not torch.equal(modules[lp.name].weight, dense[lp.name].weight)]
    assert len(changed) == sum(lp.pattern == "2:4" for lp in plan.layers)


def test_prune_unstructured_timm(tmp_path: Path, capsys) -> None:
    pytest.importorskip("timm")
    out = tmp_path / "out"
    args = ["prune", "mobilenetv3_small_100", "--sparsity", "0.4", "--budget", "magnitude", "--out", str(out)]
    assert main([*args, "--random-init"]) == 0
    assert "RANDOM weights (--random-init)" in capsys.readouterr().out
    plan = PrunePlan.load(out / "plan.json")
    model = load_model("mobilenetv3_small_100", checkpoint=out / "model.safetensors")
    modules = plan.check_model(model)
    zeros = sum(int((modules[lp.name].weight == 0).sum()) for lp in plan.layers)
    assert zeros == sum(lp.n_prune for lp in plan.layers)
    assert plan.applied["achieved_sparsity"] == pytest.approx(0.4, abs=1e-4)


def test_prune_dense_24_mix_efficientnet_lite0(efficientnet_lite0, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mix"
    args = ["prune", "efficientnet_lite0", "--sparsity", "0.3", "--pattern", "auto", "--auto-patterns", "dense,2:4"]
    assert main([*args, "--out", str(out)]) == 0
    plan = PrunePlan.load(out / "plan.json")
    assert plan.config.mix_rule == "mp-bulk" and plan.config.auto_patterns == ("dense", "2:4")
    n24 = sum(lp.pattern == "2:4" for lp in plan.layers)
    assert f"dense/2:4 mix: {n24} of {len(plan.layers)} layers take 2:4" in capsys.readouterr().out
    assert {lp.pattern for lp in plan.layers} == {"dense", "2:4"}
    removed = sum(lp.n_prune for lp in plan.layers) / sum(lp.numel for lp in plan.layers)
    # within the knapsack's 0.5 % tolerance, plus at most half a 1/4096 cost step per chosen layer
    assert abs(removed - 0.3) <= 0.005 + sum(lp.pattern == "2:4" for lp in plan.layers) / 8192
    model = load_model("efficientnet_lite0", checkpoint=out / "model.safetensors")
    modules = plan.check_model(model)
    dense = dict(efficientnet_lite0.named_modules())
    for lp in plan.layers:
        w = modules[lp.name].weight
        if lp.pattern == "2:4":
            assert check_nm(w, 2, 4) and int((w == 0).sum()) >= lp.numel // 2, lp.name
        else:
            assert torch.equal(w, dense[lp.name].weight), lp.name  # a dense layer is left as it was
    bad = ["prune", "efficientnet_lite0", "--pattern", "auto", "--mix-rule", "largest", "--out", str(tmp_path / "b")]
    assert main(bad) == 2
    assert "mix_rule must be one of" in capsys.readouterr().err
    empty = ["prune", "efficientnet_lite0", "--pattern", "auto", "--auto-patterns", ",", "--out", str(tmp_path / "e")]
    assert main(empty) == 2
    assert "auto_patterns needs at least one pattern" in capsys.readouterr().err


def test_prune_measured_mix_on_calibration_photos(efficientnet_lite0, tmp_path: Path, capsys) -> None:
    out = tmp_path / "measured"
    args = ["prune", "efficientnet_lite0", "--sparsity", "0.3", "--pattern", "auto", "--auto-patterns", "dense,2:4"]
    args += ["--mix-rule", "measured", "--data", "builtin-photos", "--n-calib", "4", "--image-size", "64"]
    assert main([*args, "--out", str(out)]) == 0
    plan = PrunePlan.load(out / "plan.json")
    assert plan.config.mix_rule == "measured" and {lp.pattern for lp in plan.layers} == {"dense", "2:4"}
    assert "chosen by mix rule 'measured' (each layer's 2:4 damage measured" in capsys.readouterr().out
    # at 50 % the candidates are rounded per layer, not chosen as a mix: no mix line, no rule recorded
    half = [a if a != "0.3" else "0.5" for a in args if a not in ("--mix-rule", "measured")]
    assert main([*half, "--out", str(tmp_path / "half")]) == 0
    assert "dense/2:4 mix:" not in capsys.readouterr().out
    assert PrunePlan.load(tmp_path / "half" / "plan.json").config.mix_rule is None
    removed = sum(lp.n_prune for lp in plan.layers) / sum(lp.numel for lp in plan.layers)
    assert abs(removed - 0.3) <= 0.005 + sum(lp.pattern == "2:4" for lp in plan.layers) / 8192
    # with calibration images 'measured' is also the default rule of the mix
    default = [a for a in args if a not in ("--mix-rule", "measured")]
    assert main([*default, "--out", str(tmp_path / "default")]) == 0
    chosen = PrunePlan.load(tmp_path / "default" / "plan.json")
    assert chosen.config.mix_rule == "measured"
    assert [lp.pattern for lp in chosen.layers] == [lp.pattern for lp in plan.layers]
    capsys.readouterr()
    # without calibration images the rule says what it needs, in prune and in analyze
    bad = ["--sparsity", "0.3", "--pattern", "auto", "--auto-patterns", "dense,2:4", "--mix-rule", "measured"]
    assert main(["prune", "efficientnet_lite0", *bad, "--out", str(tmp_path / "b")]) == 2
    assert "--data DIR or --data builtin-photos" in capsys.readouterr().err
    assert main(["analyze", "efficientnet_lite0", *bad, "--out", str(tmp_path / "a")]) == 2
    assert "measures each layer on calibration images" in capsys.readouterr().err


def test_prune_errors(tmp_path: Path, capsys) -> None:
    base = ["prune", "efficientnet_lite0", "--pattern", "2:4", "--out", str(tmp_path / "o")]
    assert main([*base, "--projection", "cast"]) == 2
    assert "--data DIR" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, "--projection", "cast", "--calib-images", str(empty)]) == 2  # the old name still works
    assert "no images" in capsys.readouterr().err
    assert main(["prune", "efficientnet_lite0", "--pattern", "2:32", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_prune_restore_efficientnet_lite0_cli(efficientnet_lite0, tmp_path: Path, capsys) -> None:
    """``mp-plugin prune --restore``: every 2:4 layer restored (recorded and printed), pattern intact on reload."""
    out = tmp_path / "out"
    args = ["prune", "efficientnet_lite0", "--pattern", "2:4", "--projection", "cast-obs", "--restore"]
    args += ["--data", "builtin-photos", "--n-calib", "4", "--image-size", "64", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "err restored" in printed and "k:n valid: yes" in printed
    plan = PrunePlan.load(out / "plan.json")
    assert plan.applied["restore"]["damp"] == 0.01
    assert plan.method == DEFAULT_RESTORE_BUDGET  # the restore route's default budget
    recs = {n: e["restore"] for n, e in plan.applied["layers"].items() if "restore" in e}
    assert set(recs) == {lp.name for lp in plan.layers if lp.pattern == "2:4"}
    assert all(r["rel_error_after"] <= r["rel_error_before"] for r in recs.values())
    model = load_model("efficientnet_lite0", checkpoint=out / "model.safetensors")
    modules = plan.check_model(model)
    assert all(check_nm(modules[n].weight, 2, 4) for n in recs)
    assert main(["prune", "efficientnet_lite0", "--pattern", "2:4", "--restore", "--out", str(tmp_path / "o")]) == 2


def test_prune_projection_follows_restore_and_prior_alpha_needs_cast(tmp_path: Path, capsys) -> None:
    base = ["prune", "efficientnet_lite0", "--pattern", "2:4", "--data", "builtin-photos", "--n-calib", "4"]
    base += ["--image-size", "64", "--threads", "1"]
    assert main([*base, "--restore", "--out", str(tmp_path / "r")]) == 0
    assert PrunePlan.load(tmp_path / "r" / "plan.json").applied["method"] == "cast-obs"  # as apply(restore=...)
    capsys.readouterr()
    assert main([*base, "--projection", "cast-obs", "--prior-alpha", "0.5", "--out", str(tmp_path / "a")]) == 2
    assert "--prior-alpha is CAST's Hamming prior: it needs --projection cast" in capsys.readouterr().err


def test_prune_a_pattern_no_layer_can_take_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["prune", "fmnist_cnn", "--pattern", "2:5", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no target layer can take 2:5" in err and "not multiples of its n" in err
    assert not (tmp_path / "p" / "plan.json").exists()
    capsys.readouterr()
    assert main(["prune", "efficientnet_lite0", "--budget", "owl", "--out", str(tmp_path / "o")]) == 2
    assert "--budget owl needs calibration images" in capsys.readouterr().err
