"""A user's own data in Python: Data.from_tensor, from_array and from_dataset split, binarize
and label as load_data does, and what they give trains."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.svi import TrainConfig, train
from ppl_vae.vae import VAEConfig, build_vae


def numbered(n=50, d=3):
    """Points whose first value is their index, and labels that are a function of it."""
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x, torch.arange(n) * 7 % 5


def test_the_split_is_a_file_s_split_and_labels_follow_their_points(tmp_path):
    x, labels = numbered()
    data = Data.from_tensor(x, labels, seed=3)
    torch.save(x, tmp_path / "x.pt")
    from_file = load_data(DataConfig(str(tmp_path / "x.pt"), seed=3))
    assert torch.equal(data.train, from_file.train) and torch.equal(data.test, from_file.test)
    assert data.test.shape == (5, 3) and data.encoding == "continuous"
    assert data.test_labels.tolist() == (data.test[:, 0].long() * 7 % 5).tolist()
    assert sorted(torch.cat([data.train, data.test])[:, 0].tolist()) == list(range(50))
    other = Data.from_tensor(x, labels, seed=4, test_fraction=0.3)
    assert other.test.shape == (15, 3) and not torch.equal(other.test[:5], data.test)


def test_a_given_test_set_is_kept_whole_with_its_labels():
    x, labels = numbered()
    data = Data.from_tensor(x[:40], test=x[40:], test_labels=labels[40:], name="mine")
    assert torch.equal(data.train, x[:40]) and torch.equal(data.test, x[40:])
    assert torch.equal(data.test_labels, labels[40:]) and data.name == "mine"
    assert Data.from_tensor(x[:40], test=x[40:41]).test.shape == (1, 3)  # one test point is enough


def test_binarizations_are_mnist_s():
    p = torch.linspace(0.05, 0.95, 10).repeat(200, 1)  # 200 points, intensities 0.05..0.95
    gray = Data.from_tensor(p, binarize="gray")
    assert gray.encoding == "gray" and not gray.is_binary
    dynamic = Data.from_tensor(p, binarize="dynamic")
    assert torch.equal(dynamic.train, gray.train) and dynamic.is_binary  # drawn per batch
    static = Data.from_tensor(p, binarize="static", seed=2)
    assert set(static.train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(static.test, Data.from_tensor(p, binarize="static", seed=2).test)
    # one Bernoulli(intensity) draw: each column's rate is its intensity, within 5 standard errors
    q = torch.linspace(0.05, 0.95, 10)
    rate = static.train.mean(0)
    assert ((rate - q).abs() < 5 * (q * (1 - q) / static.train.shape[0]).sqrt()).all()


def test_arrays_give_what_tensors_give():
    x, labels = numbered()
    a = Data.from_array(x.numpy(), labels.numpy(), seed=1)
    b = Data.from_tensor(x, labels, seed=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.test_labels, b.test_labels)
    u8 = np.arange(40 * 4, dtype=np.uint8).reshape(40, 4)
    assert torch.equal(Data.from_array(u8, test=u8[:3]).test, torch.tensor(u8[:3]).float())
    assert Data.from_array(np.ones((10, 2), dtype=np.float64)).train.dtype == torch.float32
    wide = Data.from_array(np.arange(60_000, 60_020, dtype=np.uint16).reshape(10, 2), seed=0)
    flipped = np.arange(40.0, dtype=">f8").reshape(20, 2)[::-1]  # big-endian, negative strides
    assert torch.equal(
        Data.from_array(flipped, test=flipped).test, torch.tensor(flipped.astype("<f4"))
    )
    values = torch.cat([wide.train, wide.test]).flatten().sort().values
    assert wide.train.dtype == torch.float32 and values.tolist() == list(range(60_000, 60_020))


@pytest.mark.cuda
def test_tensors_on_the_gpu_stay_there_through_the_split_and_a_static_draw():
    x = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    on_gpu = Data.from_tensor(x.cuda(), torch.arange(50), binarize="static", seed=1)
    on_cpu = Data.from_tensor(x, torch.arange(50), binarize="static", seed=1)
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.train.cpu(), on_cpu.train)
    assert torch.equal(on_gpu.test_labels.cpu(), on_cpu.test_labels)


def test_a_dataset_of_pairs_gives_what_its_tensors_give():
    x, labels = numbered()
    pairs = Data.from_dataset(TensorDataset(x, labels), seed=2)
    direct = Data.from_tensor(x, labels, seed=2)
    assert torch.equal(pairs.train, direct.train) and torch.equal(pairs.test, direct.test)
    assert torch.equal(pairs.test_labels, direct.test_labels)
    bare = Data.from_dataset([row for row in x], seed=2)  # images without labels
    assert torch.equal(bare.test, direct.test) and bare.test_labels is None
    single = Data.from_dataset(TensorDataset(x), seed=2)  # 1-tuples, as TensorDataset gives
    assert torch.equal(single.test, direct.test) and single.test_labels is None


def test_pil_images_become_intensities_in_their_orientation_after_the_transform():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 5, 7), dtype=np.uint8)  # 5 rows, 7 columns
    items = [(Image.fromarray(p, mode="L"), k % 3) for k, p in enumerate(pixels)]
    data = Data.from_dataset(items[:9], test=items[9:], binarize="gray")
    assert data.test.shape == (3, 1, 5, 7)
    assert torch.equal(data.test[:, 0], torch.from_numpy(pixels[9:]).float() / 255)
    assert data.test_labels.tolist() == [0, 1, 2]
    flipped = Data.from_dataset(items, transform=lambda im: im.transpose(Image.FLIP_LEFT_RIGHT))
    assert torch.equal(
        torch.cat([flipped.train, flipped.test]).sort(0).values,
        torch.from_numpy(pixels[:, :, ::-1].copy()).float().div(255).unsqueeze(1).sort(0).values,
    )


def test_a_torchvision_dataset_gives_what_load_data_gives(tmp_path):
    from torchvision.datasets import FashionMNIST

    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 6), ("t10k", 4)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            a = rng.integers(0, 10 if kind.startswith("labels") else 256, shape, dtype=np.uint8)
            header = np.array([0x800 + a.ndim, *a.shape], dtype=">u4").tobytes()
            (raw / f"{split}-{kind}-ubyte").write_bytes(header + a.tobytes())
    root = str(tmp_path)
    data = Data.from_dataset(
        FashionMNIST(root), test=FashionMNIST(root, train=False), binarize="gray"
    )
    loaded = load_data(DataConfig("fashion-mnist", "gray", data_dir=root))
    assert torch.equal(data.train, loaded.train) and torch.equal(data.test, loaded.test)
    assert torch.equal(data.test_labels, loaded.test_labels)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: Data.from_tensor(x, y, binarize="dynamic"),
         r"train values lie in \[0, 4\d\]; binarize='dynamic' needs intensities in \[0, 1\]: "
         r"rescale them \(8-bit images: x / 255"),
        (lambda x, y: Data.from_tensor(x, binarize="halftone"), "unknown binarization 'halftone'"),
        (lambda x, y: Data.from_tensor(x, y[:-1]), r"one integer per point, shape \(50,\)"),
        (lambda x, y: Data.from_tensor(x, y.float()), "labels must be one integer per point"),
        (lambda x, y: Data.from_tensor(x, test=x, test_fraction=0.2), "drop one of them"),
        (lambda x, y: Data.from_tensor(x, test_labels=y), "without test"),
        (lambda x, y: Data.from_tensor(x, test_fraction=1.0), r"must lie in \(0, 1\)"),
        (lambda x, y: Data.from_tensor(x[0]), r"shape \(N, \.\.\.\) with N >= 2, got \(3,\)"),
        (lambda x, y: Data.from_tensor([[1.0, 2.0]]), "got a list"),
        (lambda x, y: Data.from_tensor(x.to_sparse()), "holds a sparse tensor; pass x.to_dense()"),
        (lambda x, y: Data.from_array(np.array([["a"], ["b"]], dtype=object)), "holds object"),
        (lambda x, y: Data.from_dataset([x[0], (x[1], 1)]), "item 1 has a label and item 0 none"),
        (lambda x, y: Data.from_dataset([x[0], x[1, :2]]), r"item 1 has shape \(2,\), item 0"),
        (lambda x, y: Data.from_dataset([(x[0], "cat")]), "has label 'cat'; a label is one"),
        (lambda x, y: Data.from_dataset(["text"]), "item 0 is a str, not an image"),
        (lambda x, y: Data.from_dataset([]), "has no items"),
    ],
)  # fmt: skip
def test_bad_input_is_an_error_naming_the_fix(call, message):
    x, labels = numbered()
    with pytest.raises(InputError, match=message):
        call(x, labels)


def test_own_images_train_with_the_training_api():
    g = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(4, 1, 6, 6, generator=g) > 0.5).float()
    images = prototypes.repeat(100, 1, 1, 1).clamp(0.05, 0.95)  # 400 images of 4 kinds
    data = Data.from_tensor(images, torch.arange(400) % 4, binarize="dynamic")
    model, guide = build_vae(VAEConfig(latent_dim=2), data)
    metrics = train(model, guide, data, TrainConfig(epochs=3, batch_size=40), quiet=True)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    # 36 pixels: the untrained model's Bernoulli(1/2) scores 36 ln 2 = 25 nats per image
    assert metrics[-1]["test_elbo"] > metrics[0]["test_elbo"] > -36 * math.log(2) - 5
