"""The command line behaves as users expect (issue 13).

* the model is the first positional argument of every command, ``--num-classes`` sits
  next to every ``--checkpoint``, the same options have the same names;
* a timm name loads timm's pretrained weights from the local cache, and without them the
  command stops in one line naming ``--checkpoint FILE`` and ``--random-init`` — no silent
  random model, teacher or dense reference;
* every failure a user can cause is one line on stderr and a non-zero exit; ``--debug``
  shows the traceback; a command module that fails to import is an error, not a gap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mp_plugin.cli import main as cli
from mp_plugin.cli.main import main

COMMANDS = ("analyze", "prune", "certify", "export", "bench", "tome", "distill", "demo")
READS_CHECKPOINT = ("analyze", "prune", "certify", "export", "bench", "distill", "demo")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _empty_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no download attempt either


def test_every_command_takes_the_model_first() -> None:
    subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    extra = {"certify": ["--checkpoint", "x"], "distill": ["--checkpoint", "x", "--data", "d"]}
    for cmd in COMMANDS:
        args = subs[cmd].parse_args(["some_model", *extra.get(cmd, [])])
        assert args.model == "some_model", cmd
    for cmd in READS_CHECKPOINT:
        opts = {s for a in subs[cmd]._actions for s in a.option_strings}
        assert {"--checkpoint", "--num-classes"} <= opts, cmd
    assert _subparsers()["tome"].parse_args(["vit_base_patch16_224"]).model == "vit_base_patch16_224"


def test_same_options_have_the_same_names() -> None:
    subs = _subparsers()
    opts = {cmd: {s for a in p._actions for s in a.option_strings} for cmd, p in subs.items()}
    for cmd in ("analyze", "prune"):
        assert "--budget" in opts[cmd] and "--random-init" in opts[cmd]
    for cmd in ("prune", "demo", "certify", "distill"):
        assert "--data" in opts[cmd], cmd
    for cmd in ("prune", "demo", "certify", "distill", "bench", "tome"):
        assert "--image-size" in opts[cmd], cmd
    assert "--n-calib" in opts["prune"] and "--n-calib" in opts["demo"]
    assert "--n-eval" in opts["demo"] and "--n-eval" in opts["certify"]
    for cmd in COMMANDS:
        assert "--model" not in opts[cmd], cmd  # the model is positional everywhere


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "not_a_command"))
    with pytest.raises(ModuleNotFoundError, match="not_a_command"):
        cli.build_parser()


def test_timm_name_without_cached_weights_stops_in_one_line(monkeypatch, tmp_path, capsys) -> None:
    pytest.importorskip("timm")
    _empty_hub_cache(monkeypatch, tmp_path / "hub")
    for argv in (
        ["analyze", "test_vit", "--no-plots", "--out", str(tmp_path / "a")],
        ["prune", "test_vit", "--out", str(tmp_path / "p")],
        ["demo", "test_vit", "--out", str(tmp_path / "d")],
        ["export", "test_vit", "--out", str(tmp_path / "m.onnx")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--checkpoint FILE" in err and "--random-init" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_no_random_dense_reference_or_teacher(monkeypatch, tmp_path, capsys) -> None:
    pytest.importorskip("timm")
    from mp_plugin.evaluation.models import load_model

    _empty_hub_cache(monkeypatch, tmp_path / "hub")
    ckpt = tmp_path / "pruned.pt"
    torch.save(load_model("test_vit").state_dict(), ckpt)
    assert main(["certify", "test_vit", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c.json")]) == 2
    assert "--dense-checkpoint FILE" in capsys.readouterr().err
    (tmp_path / "data" / "a").mkdir(parents=True)
    argv = ["distill", "test_vit", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "--teacher-checkpoint FILE" in capsys.readouterr().err


def test_timm_pretrained_weights_come_from_the_local_cache(monkeypatch, tmp_path) -> None:
    """timm's own pretrained=True path, offline: weights placed in the Hugging Face cache are the ones loaded."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from mp_plugin.evaluation.model_source import load_named_model

    cache = tmp_path / "hub"
    _empty_hub_cache(monkeypatch, cache)
    ref = timm.create_model("test_vit", pretrained=False)
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            p.fill_(0.001 * (i + 1))
    repo = cache / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    model = load_named_model("test_vit")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    random = load_named_model("test_vit", random_init=True)  # explicit random init is still possible
    assert not torch.equal(random.state_dict()["head.weight"], ref.state_dict()["head.weight"])


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys) -> None:
    pytest.importorskip("timm")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00not a safetensors file")
    cases = [
        ["analyze", "no_such_model_xyz", "--no-plots"],
        ["analyze", "efficientnet_lite0", "--checkpoint", str(tmp_path / "missing.pt"), "--no-plots"],
        ["analyze", "efficientnet_lite0", "--checkpoint", str(bad), "--no-plots"],
        ["prune", "efficientnet_lite0", "--pattern", "3:2", "--out", str(tmp_path / "o")],
        ["export", "efficientnet_lite0", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "m.onnx")],
    ]
    for argv in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and err.startswith(f"mp-plugin {argv[0]}: error:"), (argv, err)
        assert "Traceback" not in err
    assert main(["--debug", *cases[0]]) != 0
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert main([*cases[3], "--debug"]) != 0  # --debug anywhere on the line
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_certify_refuses_a_text_encoder_in_one_line(minilm, tmp_path, capsys) -> None:
    ckpt = tmp_path / "minilm.pt"
    torch.save(minilm.state_dict(), ckpt)
    assert main(["certify", "minilm", "--checkpoint", str(ckpt), "--n-images", "2", "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # transformers draws its own loading bar first
    assert [line for line in err if "error" in line] == err[-1:] and "needs an image classifier" in err[-1]
    assert err[-1].startswith("mp-plugin certify: error:") and "Traceback" not in "\n".join(err)


def test_num_classes_reaches_the_model_when_a_checkpoint_is_read(tmp_path, capsys) -> None:
    pytest.importorskip("timm")
    from mp_plugin.planning.build import PrunePlan

    out = tmp_path / "p"
    prune = ["prune", "test_vit", "--random-init", "--num-classes", "7", "--include-head", "--out", str(out)]
    assert main(prune) == 0
    head = PrunePlan.load(out / "plan.json").layer("head")
    assert head.weight_shape[0] == 7
    ckpt = str(out / "model.safetensors")
    assert (
        main(
            [
                "analyze",
                "test_vit",
                "--checkpoint",
                ckpt,
                "--num-classes",
                "7",
                "--no-plots",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert main(["analyze", "test_vit", "--checkpoint", ckpt, "--no-plots", "--out", str(tmp_path / "b")]) == 2
    assert "does not match" in capsys.readouterr().err.strip().splitlines()[-1]  # 1000-class head vs 7: one line
