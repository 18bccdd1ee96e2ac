"""mp_plugin.recover.distill: loss, optimiser pieces, timm data, the masked KD loop, checkpoint/resume, bad input, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from distill_data import SmallCNN, make_image_folder, pruned_cnn, save_pruned_timm
from mp_plugin.integrations.timm import make_loaders

from mp_plugin.errors import MPPluginError, PlanMismatchError
from mp_plugin.permute.graph import Coupling
from mp_plugin.permute.record import PermutationRecord
from mp_plugin.planning.plan import PrunePlan
from mp_plugin.recover.distill import (
    DataConfig,
    DataMismatchError,
    DenseStudentError,
    DistillConfig,
    NonFiniteLossError,
    distill,
    kd_loss,
    param_groups,
    read_checkpoint,
    warmup_cosine,
)

pytest.importorskip("timm")
pytest.importorskip("PIL")

NO_AUG = DataConfig(input_size=(3, 32, 32), no_aug=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class ImageFolder of 32×32 PNG patterns (one folder, split by make_loaders)."""
    return make_image_folder(tmp_path_factory.mktemp("imgs"), n_classes=3, per_class=20)


def _zero_masks(model, plan):
    modules = dict(model.named_modules())
    return {lp.name: modules[lp.name].weight.detach() == 0 for lp in plan.layers}


# ------------------------------------------------------------------ loss and optimiser pieces


def test_kd_loss_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    ce = F.cross_entropy(s, y, label_smoothing=0.1)
    p_t = F.softmax(t / 2, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(kd_loss(s, t, y, 0.5, 2.0, 0.1), 0.5 * ce + 0.5 * kl, atol=1e-6)
    assert torch.allclose(kd_loss(s, None, y, 0.0, 2.0, 0.1), ce, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, None, 1.0, 2.0), kl, atol=1e-6)
    assert float(kd_loss(t, t, None, 1.0, 2.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        kd_loss(s, None, y, 0.5)


def test_param_groups_skip_bias_norm_and_tokens():
    import timm

    vit = timm.create_model("test_vit", num_classes=3)
    decay, no_decay = param_groups(vit, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = set(no_decay["names"])
    assert {"pos_embed", "cls_token"} <= nd
    assert all(n in nd for n in no_decay["names"] if n.endswith(".bias"))
    assert any("norm" in n and n.endswith("weight") for n in nd)
    assert all(vit.get_parameter(n).ndim >= 2 for n in decay["names"])
    assert "blocks.0.attn.qkv.weight" in decay["names"]


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_cosine(opt, total_steps=20, warmup_steps=4, start_ratio=0.0, min_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone cosine decay
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16))
    assert lrs[12] == pytest.approx(mid)


def test_family_defaults_follow_the_spec_table():
    r = DistillConfig.for_family("resnet")
    assert (r.optimizer, r.lr, r.weight_decay, r.batch_size, r.warmup_steps) == ("sgd", 1e-3, 1e-4, 256, 500)
    v = DistillConfig.for_family("vit", lr=1e-4)
    assert (v.optimizer, v.lr, v.weight_decay, v.warmup_steps) == ("adamw", 1e-4, 0.01, 1000)
    assert (v.alpha, v.tau, v.label_smoothing, v.epochs) == (0.5, 2.0, 0.1, 3)
    with pytest.raises(MPPluginError):
        DistillConfig.for_family("mlp")
    with pytest.raises(MPPluginError):
        DistillConfig(alpha=1.5)


# ------------------------------------------------------------------ data


def test_make_loaders_layouts(folder, tmp_path):
    model = SmallCNN(3)
    a = make_loaders(folder, model, 8, NO_AUG)
    b = make_loaders(folder, model, 8, NO_AUG)
    assert a.num_classes == 3 and len(a.train.dataset) + len(a.val.dataset) == 60
    assert list(a.val.dataset.indices) == list(b.val.dataset.indices)  # deterministic split
    x, y = next(iter(a.train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # ImageNet layout: train/ + val/
    make_image_folder(tmp_path, n_classes=3, per_class=6, split="train")
    make_image_folder(tmp_path, n_classes=3, per_class=2, split="val", seed=1)
    c = make_loaders(tmp_path, model, 4, NO_AUG)
    assert len(c.train.dataset) == 18 and len(c.val.dataset) == 6
    # timm's augmenting train transform is used when augmentation is on
    d = make_loaders(tmp_path, model, 4, DataConfig(input_size=(3, 32, 32)))
    assert "RandAugment" in repr(d.train.dataset.transform) and "RandomErasing" in repr(d.train.dataset.transform)


def test_empty_dataset_directory_is_refused(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(MPPluginError, match="holds no images"):
        make_loaders(tmp_path, SmallCNN(3), 4, NO_AUG)
    with pytest.raises(MPPluginError, match="does not exist"):
        make_loaders(tmp_path / "nope", SmallCNN(3), 4, NO_AUG)


# ------------------------------------------------------------------ the loop


def test_kd_reduces_loss_and_keeps_exact_sparsity(folder):
    student, teacher, plan = pruned_cnn(0.5)
    teacher_before = copy.deepcopy(teacher.state_dict())
    masks_before = _zero_masks(student, plan)
    loaders = make_loaders(folder, student, 9, NO_AUG)
    cfg = DistillConfig(epochs=5, lr=3e-3, weight_decay=0.01, warmup_steps=2, log_every=3, grad_clip=5.0)
    result = distill(student, teacher, loaders.train, cfg, val_loader=loaders.val, plan=plan, show_progress=False)
    assert result.steps == 5 * len(loaders.train)
    assert result.last_loss < 0.85 * result.first_loss
    assert result.sparsity_before == result.sparsity_after == pytest.approx(plan.planned_sparsity)
    after = _zero_masks(student, plan)
    assert all(torch.equal(masks_before[n], after[n]) for n in masks_before)  # same zeros, exactly
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # teacher frozen
    assert result.val["n"] == len(loaders.val.dataset)
    student.eval()
    with torch.no_grad():  # the reported top-1 is the student's on the validation set, recomputed here
        hits = sum(int((student(x).argmax(1) == y).sum()) for x, y in loaders.val)
    assert result.val["top1"] == pytest.approx(hits / len(loaders.val.dataset))


def test_masks_hold_with_bf16_and_sgd(folder):
    student, teacher, plan = pruned_cnn(0.6)
    masks_before = _zero_masks(student, plan)
    loaders = make_loaders(folder, student, 16, NO_AUG)
    cfg = DistillConfig(epochs=1, optimizer="sgd", lr=1e-2, weight_decay=1e-3, bf16=True)
    distill(student, teacher, loaders.train, cfg, plan=plan, show_progress=False)
    assert all(torch.equal(masks_before[n], m) for n, m in _zero_masks(student, plan).items())


def test_dense_student_is_refused(folder):
    torch.manual_seed(0)
    student, teacher = SmallCNN(3), SmallCNN(3)
    loaders = make_loaders(folder, student, 16, NO_AUG)
    with pytest.raises(DenseStudentError, match="dense model"):
        distill(student, teacher, loaders.train, DistillConfig(epochs=1), show_progress=False)
    res = distill(
        student, teacher, loaders.train, DistillConfig(epochs=1, max_steps=1, allow_dense=True), show_progress=False
    )
    assert res.steps == 1


def test_plan_not_applied_is_refused(folder):
    student, teacher, plan = pruned_cnn(0.5)
    dense = SmallCNN(3)
    loaders = make_loaders(folder, student, 16, NO_AUG)
    with pytest.raises(PlanMismatchError, match="apply the plan"):
        distill(dense, teacher, loaders.train, DistillConfig(epochs=1), plan=plan, show_progress=False)


def test_class_count_mismatch_is_refused(folder):
    student, teacher, plan = pruned_cnn(0.5, num_classes=5)
    loaders = make_loaders(folder, student, 16, NO_AUG)
    with pytest.raises(DataMismatchError, match="5 output classes but the data has 3"):
        distill(student, teacher, loaders.train, DistillConfig(epochs=1), plan=plan, show_progress=False)


def test_nan_loss_stops_at_once(folder):
    student, teacher, plan = pruned_cnn(0.5)
    with torch.no_grad():
        student.head.bias[0] = float("nan")
    loaders = make_loaders(folder, student, 16, NO_AUG)
    seen = []
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        distill(
            student,
            teacher,
            loaders.train,
            DistillConfig(epochs=2),
            plan=plan,
            callbacks=[lambda step, m, metrics: seen.append(step)],
            show_progress=False,
        )
    assert seen == []  # no optimiser step was taken


def test_checkpoint_resume_keeps_masks_and_refuses_another_plan(folder, tmp_path):
    student, teacher, plan = pruned_cnn(0.5)
    fold = Coupling(channels=32, axis=1, producers=["conv1"], ops=[], params=[("conv1.bias", 0)], consumers=["conv2"])
    PermutationRecord({"conv2": list(range(32))[::-1]}, [(fold, torch.arange(32).flip(0))]).save_to(plan)
    loaders = make_loaders(folder, student, 8, NO_AUG)
    cfg = DistillConfig(epochs=2, max_steps=5, lr=1e-3)
    first = distill(student, teacher, loaders.train, cfg, plan=plan, checkpoint_dir=tmp_path, show_progress=False)
    assert first.steps == 5 and (tmp_path / "last.pt").exists() and (tmp_path / "plan.json").exists()
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["permutations"] == {"conv2": list(range(32))[::-1]}
    assert set(state["masks"]) == {lp.name for lp in plan.layers}

    # resume into a fresh copy of the pruned model: weights, masks and permutation come back
    fresh, _, _ = pruned_cnn(0.5)
    resumed = distill(
        fresh,
        teacher,
        loaders.train,
        cfg.replace(max_steps=8),
        plan=plan,
        resume=tmp_path / "last.pt",
        show_progress=False,
    )
    assert resumed.steps == 8
    back = PermutationRecord.from_plan(PrunePlan.load(tmp_path / "plan.json"))  # the record lives in the plan
    assert back.permutations == {"conv2": list(range(32))[::-1]}
    ((site, perm),) = back.folds  # the fold record comes back too (certify aligns with it)
    assert site == fold and torch.equal(perm, torch.arange(32).flip(0))
    assert all(torch.equal(state["masks"][n], m.cpu()) for n, m in _masks_kept(fresh, plan).items())

    # a checkpoint of a different plan is refused before anything is loaded
    other, _, other_plan = pruned_cnn(0.3)
    w_before = other.conv2.weight.detach().clone()
    with pytest.raises(PlanMismatchError, match="different prune plan"):
        distill(other, teacher, loaders.train, cfg, plan=other_plan, resume=tmp_path / "last.pt", show_progress=False)
    assert torch.equal(other.conv2.weight.detach(), w_before)
    # without a plan, the masks themselves must match
    with pytest.raises(PlanMismatchError, match="different pruning"):
        distill(other, teacher, loaders.train, cfg, resume=tmp_path / "last.pt", show_progress=False)


def _masks_kept(model, plan):
    return {n: ~m for n, m in _zero_masks(model, plan).items()}


def test_callbacks_and_certificate_callback(folder):
    from mp_plugin.certificate import CertificateCallback

    student, teacher, plan = pruned_cnn(0.5)
    loaders = make_loaders(folder, student, 16, NO_AUG)
    calls = []
    x, _ = next(iter(loaders.val))
    cert = CertificateCallback(teacher, x, every_n_steps=2, mode="empirical")
    distill(
        student,
        teacher,
        loaders.train,
        DistillConfig(epochs=1, max_steps=4),
        plan=plan,
        callbacks=[lambda step, model, metrics: calls.append((step, metrics["sparsity"])), cert],
        show_progress=False,
    )
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    assert all(c[1] == pytest.approx(plan.planned_sparsity) for c in calls)
    assert [r["step"] for r in cert.history] == [2, 4]


# ------------------------------------------------------------------ CLI


def test_cli_distill_end_to_end(tmp_path):
    from safetensors.torch import load_file

    from mp_plugin.cli.main import main

    p = save_pruned_timm(tmp_path, "test_efficientnet")
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=8)
    out = tmp_path / "out"
    rc = main(
        [
            "distill", "test_efficientnet",
            "--checkpoint", str(tmp_path / "pruned.safetensors"),
            "--plan", str(tmp_path / "plan.json"),
            "--data", str(data),
            "--num-classes", "3",
            "--teacher-checkpoint", str(tmp_path / "dense.safetensors"),
            "--epochs", "1", "--max-steps", "3", "--lr", "1e-3", "--batch-size", "8",
            "--input-size", "32", "--no-aug", "--no-progress", "--device", "cpu",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "distill.json").read_text())
    assert summary["steps"] == 3 and summary["sparsity_after"] == summary["sparsity_before"]
    state = load_file(str(out / "model.safetensors"))
    zeros = sum(int((state[f"{lp.name}.weight"] == 0).sum()) for lp in p.layers)
    assert zeros == sum(lp.n_prune for lp in p.layers)
    # an empty data directory is a clear CLI error (exit 2), not a traceback
    rc = main(
        [
            "distill", "test_efficientnet", "--checkpoint", str(tmp_path / "pruned.safetensors"),
            "--plan", str(tmp_path / "plan.json"), "--data", str(tmp_path / "empty"), "--num-classes", "3",
            "--teacher-checkpoint", str(tmp_path / "dense.safetensors"), "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 2


def test_freeze_norm_stats_keeps_batchnorm_statistics(folder):
    student, teacher, plan = pruned_cnn(0.5)
    loaders = make_loaders(folder, student, 16, NO_AUG)
    stats = student.norm.running_mean.clone()
    distill(
        student, teacher, loaders.train, DistillConfig(epochs=1, freeze_norm_stats=True), plan=plan, show_progress=False
    )
    assert torch.equal(student.norm.running_mean, stats)
    distill(student, teacher, loaders.train, DistillConfig(epochs=1), plan=plan, show_progress=False)
    assert not torch.equal(student.norm.running_mean, stats)


def test_cli_distill_from_restored_weights_keeps_the_restored_masks(tmp_path):
    """prune → restore → distill: the recipe starts from the restored weights and keeps their exact 2:4 masks."""
    import timm
    from safetensors.torch import load_file, save_file

    from mp_plugin.cli.main import main
    from mp_plugin.masks.select import check_nm
    from mp_plugin.planning.build import plan
    from mp_plugin.pruning.apply_plan import apply

    torch.manual_seed(0)
    dense = timm.create_model("test_efficientnet", num_classes=3).eval()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    pruned = copy.deepcopy(dense)
    p = plan(pruned, 0.5, "2:4", "uniform")
    apply(pruned, p, calibration=[torch.randn(8, 3, 32, 32) for _ in range(2)], restore=True)
    restored = {lp.name: dict(pruned.named_modules())[lp.name].weight.detach().clone() for lp in p.layers}
    assert any("restore" in e for e in p.applied["layers"].values())
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(tmp_path / "pruned.safetensors"))
    p.save(tmp_path / "plan.json")
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=8)
    out = tmp_path / "out"
    rc = main(
        [
            "distill", "test_efficientnet",
            "--checkpoint", str(tmp_path / "pruned.safetensors"), "--plan", str(tmp_path / "plan.json"),
            "--data", str(data), "--num-classes", "3", "--teacher-checkpoint", str(tmp_path / "dense.safetensors"),
            "--epochs", "1", "--max-steps", "2", "--lr", "1e-3", "--batch-size", "8",
            "--input-size", "32", "--no-aug", "--no-progress", "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    state = load_file(str(out / "model.safetensors"))
    for lp in p.layers:
        w = state[f"{lp.name}.weight"]
        if lp.pattern == "2:4":
            assert check_nm(w, 2, 4), lp.name
            assert torch.equal(w == 0, restored[lp.name] == 0), lp.name  # the restored mask, unchanged


# ------------------------------------------------------------------ the one loop, configured


def _tiny_data(n: int = 48, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_loop_step_schedule_epoch_hooks_and_custom_loss_match_plain_ce():
    data = _tiny_data()
    cfg = DistillConfig(
        epochs=3, optimizer="sgd", lr=0.1, weight_decay=1e-3, decay_all=True, schedule="step", lr_decay=0.5,
        lr_decay_every=2, label_smoothing=0.0, seed=None, allow_dense=True, log_every=1,
    )  # fmt: skip
    runs = {}
    for name, loss in (("ce", "ce"), ("callable", lambda m, b: F.cross_entropy(m(b[0]), b[1]))):
        model, lrs, epochs = _tiny_model(), [], []
        result = distill(
            model,
            None,
            data,
            cfg,
            loss=loss,
            show_progress=False,
            callbacks=[lambda step, m, metrics, lrs=lrs: lrs.append(metrics["lr"])],
            epoch_end=[lambda m, epoch, opt, epochs=epochs: epochs.append(epoch) or f"hook {epoch}"],
        )
        runs[name] = (model, result)
        # lr for the next step after each step: ×0.5 after epoch 2 (3 steps per epoch)
        assert lrs == pytest.approx([0.1] * 5 + [0.05] * 4)
        assert epochs == [1, 2, 3]
        assert [e["epoch"] for e in result.epochs] == [1, 2, 3] and result.epochs[-1]["hook"] == "hook 3"
        assert all(math.isfinite(e["loss"]) for e in result.epochs)
    (m_ce, r_ce), (m_fn, r_fn) = runs["ce"], runs["callable"]
    for a, b in zip(m_ce.parameters(), m_fn.parameters()):
        assert torch.equal(a, b)
    assert [e["loss"] for e in r_ce.epochs] == [e["loss"] for e in r_fn.epochs]
    assert not math.isnan(r_ce.history[-1]["acc"]) and math.isnan(r_fn.history[-1]["acc"])


def test_loop_before_step_hooks_and_a_gated_keeper_hold_entries():
    from mp_plugin.masks.keep import MaskKeeper

    model = _tiny_model()
    gate = {"0": torch.rand(16, 12, generator=torch.Generator().manual_seed(2)) < 0.5}
    before = model[0].weight.detach().clone()
    seen = []

    def check_grads(step, m):
        seen.append(step)
        assert not bool(m[0].weight.grad[~gate["0"]].any())  # the keeper gated the gradient already

    cfg = DistillConfig(epochs=2, lr=1e-2, weight_decay=0.1, seed=None, allow_dense=True, eval_mode=True)
    model.train()
    with MaskKeeper.gate(model, gate) as keeper:
        distill(
            model, None, _tiny_data(), cfg, keeper=keeper, loss="ce", before_step=[check_grads], show_progress=False
        )
    assert seen == list(range(1, 7)) and model.training  # eval_mode restores the train/eval mode
    moved = model[0].weight.detach() != before
    assert bool(moved[gate["0"]].any()) and not bool(moved[~gate["0"]].any())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(MPPluginError, match="loss must be"):
        distill(_tiny_model(), None, _tiny_data(), cfg, loss="mse", show_progress=False)


class _StopAt(Exception):
    pass


@pytest.mark.parametrize("stop", [6, 9])  # resumed mid-epoch (from step 4), and from epoch 1's end (step 8)
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, stop: int):
    """Shuffle, dropout, optimizer and schedule all continue exactly: the final weights are identical."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        base[0].weight[:, :3] = 0
    cfg = DistillConfig(epochs=2, lr=1e-2, checkpoint_every=4, seed=1, warmup_steps=0)
    hooks: list[int] = []

    def run(model, **kw):
        loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        return distill(model, None, loader, cfg, loss="ce", show_progress=False, **kw)

    whole = copy.deepcopy(base)
    run(whole)

    def stopper(step, model, metrics):
        if step == stop:
            raise _StopAt

    cut = copy.deepcopy(base)
    with pytest.raises(_StopAt):
        run(cut, callbacks=[stopper], checkpoint_dir=tmp_path, epoch_end=[lambda m, e, o: hooks.append(e)])
    saved = read_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == (4 if stop == 6 else 8)
    assert hooks == ([] if stop == 6 else [1])  # at an epoch's end the checkpoint waits for its hooks
    resumed = copy.deepcopy(base)
    run(resumed, resume=tmp_path / "last.pt")
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    longer = DistillConfig(epochs=3, lr=1e-2, seed=1, warmup_steps=0)  # another length: the schedule would change
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with pytest.warns(UserWarning, match="planned for 16 steps as one of 24"):
        distill(copy.deepcopy(base), None, loader, longer, loss="ce", show_progress=False, resume=tmp_path / "last.pt")
