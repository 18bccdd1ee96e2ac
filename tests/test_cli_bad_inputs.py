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
    assert_named_one_line(code, err, "prune", "image size")


def test_negative_max_rows(capsys, tmp_path) -> None:
    code, err = run_cli(capsys, ["prune", "cli_bad_inputs_cnn", "--max-rows", "-3", "--out", str(tmp_path / "o")])
    assert_named_one_line(code, err, "prune", "max_rows")


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
