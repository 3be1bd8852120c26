"""Data: MNIST encodings, synthetic sets, batching by index, the data root, bad data."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import needs_mnist

from ppl_vae.data import (
    Data,
    DataConfig,
    data_fingerprint,
    load_data,
    resolve_data_root,
    synthetic_2d,
)
from ppl_vae.errors import InputError


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("PPL_VAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_root() == tmp_path / "cache" / "ppl_vae"


@needs_mnist
def test_mnist_encodings():
    gray = load_data(DataConfig("mnist", "gray"))
    assert gray.train.shape == (60000, 1, 28, 28) and gray.test.shape == (10000, 1, 28, 28)
    assert gray.train.min() == 0 and gray.train.max() == 1 and not gray.is_binary
    # mean MNIST training intensity is 0.1307 (the figure every MNIST normalisation uses)
    assert gray.train.mean().item() == pytest.approx(0.1307, abs=1e-4)
    static_a = load_data(DataConfig("mnist", "static", seed=3))
    static_b = load_data(DataConfig("mnist", "static", seed=3))
    assert torch.equal(static_a.train, static_b.train) and static_a.is_binary
    assert set(static_a.test.unique().tolist()) == {0.0, 1.0}
    dynamic = load_data(DataConfig("mnist", "dynamic"))
    assert torch.equal(dynamic.train, gray.train)  # intensities kept, binarized per batch
    g = torch.Generator().manual_seed(0)
    first = next(dynamic.batches(60000, shuffle=False, generator=g))
    second = next(dynamic.batches(60000, shuffle=False, generator=g))
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    # a fresh Bernoulli(intensity) draw: the mean of the draws is the mean intensity
    n = first.numel()
    se = math.sqrt(0.1307 * (1 - 0.1307) / n)
    assert abs(first.mean().item() - gray.train.mean().item()) < 5 * se


def test_dynamic_binarization_draws_bernoulli_intensity():
    p = torch.linspace(0.05, 0.95, 10).reshape(10, 1).expand(10, 2000).contiguous()
    data = Data(p, p[:2], "dynamic")
    g = torch.Generator().manual_seed(1)
    x = next(data.batches(10, shuffle=False, generator=g))
    rate = x.mean(1)
    se = (p[:, 0] * (1 - p[:, 0]) / 2000).sqrt()
    assert ((rate - p[:, 0]).abs() < 5 * se).all()


def test_batches_cover_every_point_once_and_follow_the_generator():
    x = torch.arange(23.0).reshape(23, 1)
    data = Data(x, x[:3], "continuous")
    batches = list(data.batches(5, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(batches).flatten().tolist()) == list(range(23))
    again = list(data.batches(5, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert torch.cat(list(data.batches(5, shuffle=False))).flatten().tolist() == list(range(23))


@pytest.mark.parametrize("name", ["pinwheel", "moons", "ring8"])
def test_synthetic_sets_are_seeded(name):
    a = synthetic_2d(name, 500, torch.Generator().manual_seed(0))
    b = synthetic_2d(name, 500, torch.Generator().manual_seed(0))
    c = synthetic_2d(name, 500, torch.Generator().manual_seed(1))
    assert a.shape == (500, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_ring8_is_eight_gaussians_on_a_circle_of_radius_two():
    x = synthetic_2d("ring8", 8000, torch.Generator().manual_seed(0))
    radius = x.norm(dim=1)
    assert radius.mean().item() == pytest.approx(2.0, abs=0.01)
    angle = torch.atan2(x[:, 1], x[:, 0])
    k = torch.round(angle / (2 * math.pi / 8)) % 8
    counts = torch.bincount(k.long(), minlength=8).float()
    assert ((counts - 1000).abs() < 5 * math.sqrt(1000 * 7 / 8)).all()


def test_bad_data_are_rejected(tmp_path):
    for bad in (math.nan, math.inf, -math.inf):  # in the training or the test split
        with pytest.raises(ValueError, match="train data contain NaN or infinite"):
            Data(torch.tensor([[0.0], [bad], [1.0]]), torch.zeros(1, 1), "continuous")
        with pytest.raises(ValueError, match="test data contain NaN or infinite"):
            Data(torch.zeros(3, 1), torch.tensor([[0.5], [0.5], [bad]]), "dynamic")
    for outside in (-1e-6, 1.5):  # dynamic binarization draws Bernoulli(x): x in [0, 1]
        inside, out = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.5], [outside]])
        for train, test, split in ((out, inside, "train"), (inside, out, "test")):
            with pytest.raises(ValueError, match=rf"values in \[0, 1\], the {split} data span"):
                Data(train, test, "dynamic")
        Data(out, out, "continuous")  # other encodings take any finite values
    Data(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0]]), "dynamic")
    with pytest.raises(ValueError, match="shapes differ"):
        Data(torch.zeros(3, 2), torch.zeros(3, 4), "continuous")
    with pytest.raises(ValueError, match="floating-point"):
        Data(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), "continuous")
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        load_data(DataConfig("svhn"))
    with pytest.raises(ValueError, match="unknown binarization"):
        load_data(DataConfig("mnist", "halftone"))
    np.save(tmp_path / "one.npy", np.zeros(4, dtype="float32"))
    with pytest.raises(ValueError, match=r"shape \(N, \.\.\.\)"):
        load_data(DataConfig(str(tmp_path / "one.npy")))


def test_file_data_are_split_ninety_ten(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(100, 3)))
    data = load_data(DataConfig(str(tmp_path / "x.npy")))
    assert data.train.shape == (90, 3) and data.test.shape == (10, 3)
    assert data.train.dtype == torch.float32


def test_missing_mnist_offline_names_where_it_looked(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(FileNotFoundError) as e:
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert str(Path(tmp_path) / "MNIST" / "raw") in msg and "PPL_VAE_DATA" in msg
    assert "\n" not in msg
    assert os.listdir(tmp_path) in ([], ["MNIST"])  # nothing but torchvision's empty folders


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.randn(40, 3).to_sparse(), "holds a sparse tensor; save x.to_dense()"),
        (lambda: torch.randn(40, 2, dtype=torch.complex64), "holds complex values"),
        (lambda: torch.full((40, 2), 1e300, dtype=torch.float64), "beyond torch.float32's range"),
    ],
)
def test_file_data_that_cannot_be_modelled_get_a_clear_error(make, message, tmp_path):
    torch.save(make(), tmp_path / "x.pt")
    with pytest.raises(ValueError, match=message):
        load_data(DataConfig(str(tmp_path / "x.pt")))


def test_a_truncated_mnist_file_is_named_with_its_size(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte has 100 bytes, not 10008"):
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))


def test_a_mistyped_data_dir_leaves_nothing_behind(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        load_data(DataConfig("mnist", data_dir=str(tmp_path / "typo")))
    assert not (tmp_path / "typo").exists()


def test_head_keeps_the_first_points_their_labels_and_the_encoding():
    data = load_data(DataConfig("ring8", num_train=50, num_test=40))
    small = data.head(10, 7)
    assert torch.equal(small.train, data.train[:10]) and torch.equal(small.test, data.test[:7])
    assert torch.equal(small.test_labels, data.test_labels[:7])
    assert (small.encoding, small.name) == (data.encoding, data.name)
    assert data.head(num_test=5).train.shape[0] == 50  # None keeps the split whole
    with pytest.raises(InputError, match="num_train must be a positive integer, got 0"):
        data.head(0)


def test_tensors_saved_with_requires_grad_or_as_parameters_are_detached(tmp_path):
    x = torch.nn.Parameter(torch.randn(20, 3))
    torch.save(x, tmp_path / "param.pt")
    torch.save(torch.randn(20, 3).requires_grad_(), tmp_path / "grad.pt")
    for name in ("param.pt", "grad.pt"):
        data = load_data(DataConfig(dataset=str(tmp_path / name)))
        assert not data.train.requires_grad and not data.test.requires_grad
        assert type(data.train) is torch.Tensor
    data = Data(x, x.detach()[:4], "continuous")
    assert not data.train.requires_grad and type(data.train) is torch.Tensor


@pytest.mark.parametrize("shape", [(10, 0), (10, 3, 0)])
def test_points_with_no_features_are_refused(tmp_path, shape):
    np.save(tmp_path / "empty.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(InputError, match=r"data have no features: shape \(9, .*at least one value"):
        load_data(DataConfig(dataset=str(tmp_path / "empty.npy")))


def test_the_fingerprint_changes_with_one_value_and_only_then():
    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(50, 4, generator=g), torch.rand(10, 4, generator=g)
    a = data_fingerprint(Data(train, test, "continuous"))
    assert a == data_fingerprint(Data(train.clone(), test.clone(), "gray", name="copy"))
    assert len(a) == 64 and int(a, 16) >= 0
    changed = test.clone()
    changed[3, 2] += 1e-6
    assert data_fingerprint(Data(train, changed, "continuous")) != a
    assert data_fingerprint(Data(train.double(), test.double(), "continuous")) != a  # dtype
    assert data_fingerprint(Data(train.reshape(50, 2, 2), test.reshape(10, 2, 2), "gray")) != a
    swapped = Data(torch.cat([train, test[:1]]), test[1:], "continuous")  # same bytes, split moved
    assert data_fingerprint(swapped) != a
