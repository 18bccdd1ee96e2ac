"""Fashion-MNIST loader (real Debian data), IDX parsing, clear errors, and the trained zoo."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from fashion_mnist_setup import fashion_mnist_or_skip

from mp_plugin.errors import DatasetUnavailable, MPPluginError
from mp_plugin.evaluation.fashion_mnist import ENV_VAR, load_fashion_mnist, read_idx


@pytest.fixture(scope="module")
def fmnist():
    return fashion_mnist_or_skip()


def test_shapes_dtypes_and_balanced_labels(fmnist):
    train, test = fmnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10


def test_pixel_statistics_are_those_of_real_fashion_mnist(fmnist):
    train, test = fmnist
    # Published normalisation constants of Fashion-MNIST train: mean 0.2860, std 0.3530.
    assert abs(float(train.images.mean()) - 0.2860) < 5e-4
    assert abs(float(train.images.std()) - 0.3530) < 5e-4
    assert abs(float(test.images.mean()) - 0.2860) < 3e-3


def test_nearest_class_mean_classifies_real_images(fmnist):
    # Random or shuffled data would give ~10%; real Fashion-MNIST class means give ~68%.
    train, test = fmnist
    x, y = train.images.flatten(1), train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(test.images.flatten(1), means).argmin(1)
    acc = float((pred == test.labels).float().mean())
    assert 0.6 < acc < 0.8


def test_subset_is_fixed_and_sized(fmnist):
    train, _ = fmnist
    a, b = train.subset(500, seed=3), train.subset(500, seed=3)
    assert len(a) == 500 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.labels, train.subset(500, seed=4).labels)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip_and_other_directory(tmp_path, monkeypatch, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    data = load_fashion_mnist("test")
    assert torch.allclose(data.images[:, 0] * 255.0, torch.from_numpy(images).float())
    assert data.labels.tolist() == list(range(7))


def test_missing_data_names_the_apt_package(tmp_path):
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist("train", root=tmp_path)
    assert isinstance(info.value, MPPluginError)


def test_truncated_and_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 9, 0, 0, 0, 28, 0, 0, 0, 28, 1]))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DatasetUnavailable, match="truncated"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(DatasetUnavailable, match="magic"):
        read_idx(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)


def test_zoo_names_registered_and_cache_is_used(tmp_path):
    from mp_plugin.evaluation import zoo
    from mp_plugin.evaluation.models import BUILTIN_MODELS

    assert {"fmnist_mlp", "fmnist_cnn", "fmnist_vit"} <= set(BUILTIN_MODELS)
    for name in zoo.ZOO:
        out = zoo.build_model(name)(torch.zeros(2, 1, 28, 28))
        assert out.shape == (2, 10)
    # A cached state_dict is loaded as is, without training.
    model = zoo.build_model("fmnist_mlp")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.125)
    weights, _ = zoo._paths("fmnist_mlp", tmp_path)
    weights.parent.mkdir(parents=True)
    torch.save(model.state_dict(), weights)
    loaded = zoo.trained_model("fmnist_mlp", root=tmp_path)
    assert all(torch.all(p == 0.125) for p in loaded.parameters())
    with pytest.raises(MPPluginError, match="unknown zoo model"):
        zoo.trained_model("fmnist_resnet", root=tmp_path)


@pytest.mark.slow
def test_trained_mlp_spectrum_has_spikes_that_init_lacks(fmnist):
    from mp_plugin.evaluation.zoo import build_model, trained_model, zoo_record
    from mp_plugin.spectrum import fit_marchenko_pastur

    trained, init = trained_model("fmnist_mlp"), build_model("fmnist_mlp")
    assert zoo_record("fmnist_mlp")["test_accuracy"] > 0.82
    for idx in (1, 3):  # the two hidden Linear layers
        n_init = fit_marchenko_pastur(init[idx].weight.detach()).n_spikes
        n_trained = fit_marchenko_pastur(trained[idx].weight.detach()).n_spikes
        assert n_init <= 2 and n_trained >= 10, (idx, n_init, n_trained)


def test_zoo_names_match_and_load_model_does_not_import_the_trainer():
    import subprocess
    import sys

    from mp_plugin.evaluation.models import ZOO_NAMES
    from mp_plugin.evaluation.zoo import ZOO

    assert tuple(ZOO) == ZOO_NAMES
    code = "import sys, mp_plugin.evaluation.models; print('mp_plugin.evaluation.classifier_training' in sys.modules, 'mp_plugin.evaluation.zoo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
