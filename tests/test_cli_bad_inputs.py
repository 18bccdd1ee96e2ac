"""The CLI on bad input (issue 18, item 7): one named error line and exit code 2, never a traceback.

Exit code 2 means the library raised a named :class:`mp_plugin.MPPluginError`; a
foreign exception would also print one line (``main`` catches everything) but
exit with 1, so these tests check that each failure is named at its root.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mp_plugin.cli.main import main
from mp_plugin.evaluation.models import register_builtin_model, save_pruned_checkpoint

torch.set_num_threads(1)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


register_builtin_model("cli_bad_inputs_cnn")(_tiny_cnn)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a bad argument type itself: same one line, exit 2
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_named_one_line(code: int, err: str, command: str, match: str) -> None:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"mp-plugin {command}: error:")]
    assert len(errors) == 1, err
    assert code == 2, f"exit {code} (1 = foreign exception): {errors[0]}"
    assert match in errors[0], errors[0]


@pytest.fixture
def images(tmp_path) -> Path:
    pil = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    folder.mkdir()
    pil.new("RGB", (20, 16), (120, 30, 200)).save(folder / "ok.png")
    return folder


def test_threads_must_be_positive(capsys, tmp_path) -> None:
    code, err = run_cli(capsys, ["prune", "cli_bad_inputs_cnn", "--threads", "-1", "--out", str(tmp_path / "o")])
    assert_named_one_line(code, err, "prune", "--threads")


def test_out_is_an_existing_file(capsys, tmp_path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    code, err = run_cli(capsys, ["prune", "cli_bad_inputs_cnn", "--pattern", "2:4", "--out", str(blocker)])
    assert_named_one_line(code, err, "prune", "existing file")


def test_corrupt_calibration_image(capsys, tmp_path, images) -> None:
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["prune", "cli_bad_inputs_cnn", "--pattern", "2:4", "--projection", "cast", "--data", str(images)]
    code, err = run_cli(capsys, [*argv, "--out", str(tmp_path / "o")])
    assert_named_one_line(code, err, "prune", "broken.jpg")


def test_image_size_zero(capsys, tmp_path, images) -> None:
    argv = ["prune", "cli_bad_inputs_cnn", "--pattern", "2:4", "--projection", "cast", "--data", str(images)]
    code, err = run_cli(capsys, [*argv, "--image-size", "0", "--out", str(tmp_path / "o")])
    assert_named_one_line(code, err, "prune", "--image-size")


def test_negative_max_rows(capsys, tmp_path) -> None:
    code, err = run_cli(capsys, ["prune", "cli_bad_inputs_cnn", "--max-rows", "-3", "--out", str(tmp_path / "o")])
    assert_named_one_line(code, err, "prune", "--max-rows")
    assert not (tmp_path / "o").exists()  # refused before any work or file


@pytest.mark.parametrize("content", [None, '{"schema_version": 1, "layers": ['])
def test_export_plan_missing_or_truncated(capsys, tmp_path, content) -> None:
    pytest.importorskip("onnx")
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    argv = ["export", "cli_bad_inputs_cnn", "--plan", str(plan), "--out", str(tmp_path / "m.onnx")]
    code, err = run_cli(capsys, argv)
    assert_named_one_line(code, err, "export", "plan.json")


@pytest.mark.parametrize("case", ["random", "truncated", "header", "empty_pt", "corrupt_pt", "other_arch", "directory"])
def test_bad_checkpoints(capsys, tmp_path, case) -> None:
    good = save_pruned_checkpoint(_tiny_cnn(), tmp_path / "good")
    raw = good.read_bytes()
    path = {
        "random": tmp_path / "r.safetensors",
        "truncated": tmp_path / "t.safetensors",
        "header": tmp_path / "h.safetensors",
        "empty_pt": tmp_path / "e.pt",
        "corrupt_pt": tmp_path / "c.pt",
        "other_arch": tmp_path / "o.pt",
        "directory": tmp_path / "good",
    }[case]
    if case == "random":
        path.write_bytes(b"\x07" * 100)
    elif case == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    elif case == "header":
        path.write_bytes(raw[:8] + b"]" * 12 + raw[20:])
    elif case == "empty_pt":
        path.write_bytes(b"")
    elif case == "corrupt_pt":
        path.write_bytes(b"\x80\x02garbage")
    elif case == "other_arch":
        torch.save(nn.Linear(5, 5).state_dict(), path)
    code, err = run_cli(
        capsys, ["prune", "cli_bad_inputs_cnn", "--checkpoint", str(path), "--out", str(tmp_path / "o")]
    )
    assert_named_one_line(code, err, "prune", "checkpoint" if case != "other_arch" else "does not match")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["bench", "cli_bad_inputs_cnn", "--batch", "-4"], "--batch"),
        (["bench", "cli_bad_inputs_cnn", "--iters", "0"], "--iters"),
        (["demo", "cli_bad_inputs_cnn", "--n-eval", "-2"], "--n-eval"),
        (["demo", "cli_bad_inputs_cnn", "--n-calib", "0"], "--n-calib"),
        (["export", "cli_bad_inputs_cnn", "--opset", "0"], "--opset"),
        (["analyze", "cli_bad_inputs_cnn", "--num-classes", "-1"], "--num-classes"),
        (["analyze", "cli_bad_inputs_cnn", "--max-rows", "-1"], "--max-rows"),
        (["certify", "cli_bad_inputs_cnn", "--checkpoint", "x.pt", "--n-eval", "0"], "--n-eval"),
        (["prune", "cli_bad_inputs_cnn", "--restore-damp", "-1"], "--restore-damp"),
    ],
)
def test_counts_and_sizes_are_checked_when_parsed(capsys, argv, match) -> None:
    code, err = run_cli(capsys, argv)
    assert_named_one_line(code, err, argv[0], match)


def test_num_classes_is_refused_for_a_built_in(capsys, tmp_path) -> None:
    argv = ["analyze", "cli_bad_inputs_cnn", "--num-classes", "3", "--out", str(tmp_path / "o")]
    code, err = run_cli(capsys, argv)
    assert_named_one_line(code, err, "analyze", "fixed one")


def test_outputs_that_cannot_be_written_are_refused_before_the_work(capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["certify", "cli_bad_inputs_cnn", "--checkpoint", "x.pt", "--out", str(tmp_path)], "is a directory"),
        (["certify", "cli_bad_inputs_cnn", "--checkpoint", "x.pt", "--out", str(blocker / "c.json")], "is a file"),
        (["export", "cli_bad_inputs_cnn", "--out", str(tmp_path)], "is a directory"),
        (["export", "cli_bad_inputs_cnn", "--json", str(blocker / "r.json")], "is a file"),
        (["bench", "cli_bad_inputs_cnn", "--out", str(tmp_path)], "is a directory"),
        (["demo", "cli_bad_inputs_cnn", "--out", str(blocker)], "existing file"),
    ]
    for argv, match in cases:
        code, err = run_cli(capsys, argv)
        assert_named_one_line(code, err, argv[0], match)
    (tmp_path / "o" / "plan.json").mkdir(parents=True)
    code, err = run_cli(capsys, ["prune", "cli_bad_inputs_cnn", "--out", str(tmp_path / "o")])
    assert_named_one_line(code, err, "prune", "plan.json there is a directory")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_certify_refuses_a_plan_of_another_model_and_a_checkpoint_without_its_plan(capsys, tmp_path) -> None:
    import mp_plugin as mp

    model = _tiny_cnn()
    plan = mp.plan(model, 0.5, "unstructured", "magnitude")
    mp.apply(model, plan)
    save_pruned_checkpoint(model, tmp_path / "good", plan)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    other = mp.plan(
        mlp, 0.5, "unstructured", "magnitude", mp.PlanConfig(selection=mp.LayerSelection(exclude_head=False))
    )
    other.save(tmp_path / "other.json")
    base = ["certify", "cli_bad_inputs_cnn", "--image-size", "16", "--n-eval", "4", "--out", str(tmp_path / "c.json")]
    ckpt = str(tmp_path / "good" / "model.safetensors")
    code, err = run_cli(capsys, [*base, "--checkpoint", ckpt, "--plan", str(tmp_path / "other.json")])
    assert_named_one_line(code, err, "certify", "plan")
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "model.safetensors").write_bytes((tmp_path / "good" / "model.safetensors").read_bytes())
    code, err = run_cli(capsys, [*base, "--checkpoint", str(tmp_path / "lone" / "model.safetensors")])
    assert_named_one_line(code, err, "certify", "saved with a plan.json")
    code, err = run_cli(capsys, [*base, "--checkpoint", str(tmp_path / "good")])
    assert_named_one_line(code, err, "certify", "is a directory")
