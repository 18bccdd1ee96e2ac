"""Distillation guards: config validation, resume checks, a caller's keeper, train flags, CLI argument types."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mp_plugin.cli.common import strict_json
from mp_plugin.cli.main import main
from mp_plugin.errors import MPPluginError
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.recover.distill import DistillConfig, distill, read_checkpoint

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_steps", 0),
        ("grad_clip", -1.0),
        ("grad_clip", 0.0),
        ("weight_decay", -0.1),
        ("momentum", 1.0),
        ("min_lr_ratio", 1.5),
        ("warmup_steps", -1),
        ("warmup_start_ratio", -0.5),
        ("log_every", 0),
        ("num_workers", -1),
        ("checkpoint_every", -2),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("tau", float("nan")),
        ("lr_decay", float("nan")),
    ],
)
def test_config_refuses_out_of_range_values(field: str, value: float) -> None:
    with pytest.raises(MPPluginError, match=field):
        DistillConfig(**{field: value})


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        m[0].weight[:, :3] = 0
    return m


def test_a_callers_keeper_stays_attached_and_train_flags_come_back() -> None:
    model = _model()
    model.train()
    model[1].eval()  # a submodule the caller froze in eval mode
    gate = {"0": model[0].weight.detach() != 0}
    with MaskKeeper.gate(model, gate) as keeper:
        user_opt = torch.optim.SGD(model.parameters(), lr=0.5)
        keeper.attach(user_opt)
        hooks = keeper.hook_count
        x, y = _data()
        cfg = DistillConfig(epochs=1, lr=1e-2, seed=None, allow_dense=True)
        distill(model, None, [(x[:16], y[:16])], cfg, keeper=keeper, loss="ce", show_progress=False)
        assert keeper.hook_count == hooks  # distill removed only its own hooks
        assert model.training and not model[1].training  # every flag as the caller left it
        # the caller's own optimizer still keeps the zeros
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        user_opt.step()
        assert not bool(model[0].weight.detach()[:, :3].any())


class _Augmented(TensorDataset):
    """Adds fresh noise to every sample it serves: an augmentation drawn from the global generator."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return x + 0.1 * torch.randn_like(x), y


def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(_Augmented(x, y), batch_size=8, shuffle=True)


def _recording_loss(seen: list[float]):
    def loss(model, batch):
        seen.append(float(batch[0][0, 0]))
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    return loss


def test_a_run_stopped_by_max_steps_mid_epoch_resumes_in_the_same_order(tmp_path) -> None:
    """The final checkpoint of a run that stops mid-epoch keeps the epoch's shuffle: the resumed run
    sees exactly the batches the uninterrupted one sees, and ends on the same weights."""
    x, y = _data()
    cfg = DistillConfig(epochs=2, lr=1e-2, seed=1, warmup_steps=0, schedule="constant", weight_decay=0.0)
    whole, seen_whole = _model(), []
    distill(whole, None, _loader(x, y), cfg, loss=_recording_loss(seen_whole), show_progress=False)
    cut, seen_cut = _model(), []
    distill(
        cut, None, _loader(x, y), cfg.replace(max_steps=6), loss=_recording_loss(seen_cut),
        checkpoint_dir=tmp_path, show_progress=False,
    )  # fmt: skip
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 6
    resumed = _model()
    with pytest.warns(UserWarning, match="planned for 6 steps as one of 16"):
        distill(
            resumed, None, _loader(x, y), cfg, loss=_recording_loss(seen_cut),
            resume=tmp_path / "last.pt", show_progress=False,
        )  # fmt: skip
    assert seen_cut == seen_whole
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_resume_refuses_another_optimizer_and_warns_on_changed_settings(tmp_path) -> None:
    x, y = _data()
    cfg = DistillConfig(epochs=1, max_steps=2, lr=1e-2, seed=1)
    distill(_model(), None, _loader(x, y), cfg, loss="ce", checkpoint_dir=tmp_path, show_progress=False)
    untouched = _model()
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(MPPluginError, match="optimizer 'adamw'.*'sgd'"):
        distill(
            untouched, None, _loader(x, y), cfg.replace(optimizer="sgd"), loss="ce",
            resume=tmp_path / "last.pt", show_progress=False,
        )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())  # refused before loading
    with pytest.warns(UserWarning, match="changed optimizer settings \\(lr 0.01 → 0.5\\)"):
        distill(
            _model(), None, _loader(x, y), cfg.replace(lr=0.5, max_steps=3), loss="ce",
            resume=tmp_path / "last.pt", show_progress=False,
        )  # fmt: skip


def test_read_checkpoint_refuses_a_directory(tmp_path) -> None:
    with pytest.raises(MPPluginError, match="is a directory"):
        read_checkpoint(tmp_path)


def test_strict_json_replaces_non_finite_numbers() -> None:
    value = {"loss": float("nan"), "hist": [1.0, float("inf"), {"x": -float("inf")}], "n": 3, "s": "a"}
    out = strict_json(value)
    assert out == {"loss": None, "hist": [1.0, None, {"x": None}], "n": 3, "s": "a"}
    json.dumps(out, allow_nan=False)
    assert math.isnan(value["loss"])  # the input is not changed


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--grad-clip", "-5"], "--grad-clip"),
        (["--device", "gpu0"], "--device"),
        (["--workers", "-1"], "--workers"),
        (["--tome-r", "-2"], "--tome-r"),
    ],
)
def test_distill_cli_refuses_bad_numbers_before_it_starts(capsys, tmp_path, argv, match) -> None:
    base = ["distill", "--checkpoint", str(tmp_path / "w.pt"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(base + argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [(["--r", "-1"], "--r"), (["--img-size", "0"], "--image-size")])
def test_tome_cli_refuses_bad_numbers(capsys, argv, match) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tome", "vit_tiny_patch16_224", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_tome_cli_refuses_unknown_model_and_a_directory_for_json(capsys, tmp_path) -> None:
    pytest.importorskip("timm")
    assert main(["tome", "no_such_vit"]) == 2
    assert "unknown timm model 'no_such_vit'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # refused when parsed, before any work
        main(["tome", "vit_tiny_patch16_224", "--json", str(tmp_path)])
    assert exc.value.code == 2 and "is a directory" in capsys.readouterr().err


def test_mac_table_of_a_patched_vit_keeps_a_dense_row() -> None:
    pytest.importorskip("timm")
    from mp_plugin.evaluation.models import random_timm_model
    from mp_plugin.recover.tome import apply_patch, is_patched, tome_mac_table

    model = random_timm_model("vit_tiny_patch16_224", 64)
    plain = tome_mac_table(copy.deepcopy(model), r=2, img_size=64)
    apply_patch(model, r=2)
    patched = tome_mac_table(model, r=2, img_size=64)
    assert is_patched(model)  # the caller's model keeps its patch
    assert patched["dense_macs"] == plain["dense_macs"] and patched["tome_macs"] == plain["tome_macs"]
    assert patched["dense_macs"] > patched["tome_macs"]


@pytest.mark.parametrize("merge_teacher", [False, True])
def test_distill_cli_with_tome_merges_the_student_and_only_on_request_the_teacher(
    tmp_path, monkeypatch, merge_teacher: bool
) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("PIL")
    from distill_data import make_image_folder, save_pruned_timm

    import mp_plugin.recover.distill as distill_pkg
    from mp_plugin.recover.tome import is_patched

    save_pruned_timm(tmp_path, "test_vit")
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=4)
    seen = {}
    real = distill_pkg.distill

    def spy(student, teacher, *args, **kwargs):
        seen["student"], seen["teacher"] = is_patched(student), is_patched(teacher)
        return real(student, teacher, *args, **kwargs)

    monkeypatch.setattr(distill_pkg, "distill", spy)
    argv = [
        "distill", "test_vit", "--checkpoint", str(tmp_path / "pruned.safetensors"), "--plan", str(tmp_path / "plan.json"),
        "--data", str(data), "--num-classes", "3", "--teacher-checkpoint", str(tmp_path / "dense.safetensors"),
        "--max-steps", "1", "--batch-size", "4", "--no-aug", "--no-progress", "--device", "cpu",
        "--out", str(tmp_path / "out"), "--tome-r", "4",
    ]  # fmt: skip
    assert main(argv + (["--tome-teacher"] if merge_teacher else [])) == 0
    assert seen == {"student": True, "teacher": merge_teacher}
    assert main(argv[:-2] + ["--tome-teacher"]) == 2  # it needs --tome-r


def test_gradient_clipping_counts_only_the_weights_that_train() -> None:
    """Pruned entries' gradients are masked before clipping, so they neither shrink the kept weights'
    step (the clip norm) nor reach the optimizer."""
    model = _model()
    x, y = _data()
    grads = []

    def look(step, m):
        grads.append((m[0].weight.grad.detach().clone(), [p.grad.detach().clone() for p in m.parameters()]))

    cfg = DistillConfig(epochs=1, max_steps=2, lr=1e-2, grad_clip=1e-3, seed=None, warmup_steps=0)
    distill(model, None, [(x[:16], y[:16])] * 2, cfg, loss="ce", before_step=[look], show_progress=False)
    for w_grad, all_grads in grads:
        assert not bool(w_grad[:, :3].any())  # the pruned columns' gradients are masked
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in all_grads]))
        assert float(total) == pytest.approx(1e-3, rel=1e-3)  # clipped to the norm of what trains


def test_a_keeper_follows_the_model_to_another_device() -> None:
    """Masks made on the CPU move with the model (here to the meta device, which needs no GPU)."""
    model = _model()
    keeper = MaskKeeper(model)
    model.to("meta")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    keeper.apply()
    keeper.mask_grads()
    assert keeper.masks["0"].device.type == "meta"
    gated = MaskKeeper(_model(), hold="values")
    gated.model.to("meta")
    gated.apply()
    assert gated._held["0"].device.type == "meta"
    resumed = MaskKeeper(_model(), hold="values")  # a resume: load_state_dict moves the masks, not the held values
    resumed.model.to("meta")
    resumed.load_state_dict(resumed.state_dict())
    resumed.apply()
    # gradient gates registered before a dtype change follow it
    model = _model()
    keeper = MaskKeeper(model, zero_grads=True).attach()
    model.to(torch.float64)
    x, y = _data()
    torch.nn.functional.cross_entropy(model(x.double()), y).backward()
    assert model[0].weight.grad.dtype == torch.float64 and not bool(model[0].weight.grad[:, :3].any())
    keeper.detach()
