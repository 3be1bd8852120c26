"""The image sets: small files written here in the layouts torchvision and Burda et al.'s
chardata.mat use, read back equal (orientation included); scikit-learn's digits; missing files."""

import gzip
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_cli

from ppl_vae.data import DATASETS, DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.images import IMAGE_SETS

TRAIN, TEST = 7, 5  # images per split in the files made here


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """An IDX file of unsigned bytes: magic 0x0000080D (D dimensions), D big-endian sizes."""
    header = np.array([0x800 + array.ndim, *array.shape], dtype=">u4").tobytes()
    body = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.with_name(path.name + ".gz") if gz else path).write_bytes(
        gzip.compress(body) if gz else body
    )


def idx_set(raw, names, transposed=False, gz=False, seed=0):
    """Writes four IDX files of asymmetric 28x28 images and labels; returns the upright images
    (as the model should see them) and the labels, per split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, (images_file, labels_file) in (
        ("train", TRAIN, names[:2]),
        ("test", TEST, names[2:]),
    ):
        upright = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        upright[:, :3, :] = 255  # a bar along the top: no image equals its transpose
        upright[:, 3:, :3] = 0
        labels = rng.integers(1, 27, size=n, dtype=np.uint8)
        stored = upright.transpose(0, 2, 1) if transposed else upright
        write_idx(raw / images_file, stored, gz)
        write_idx(raw / labels_file, labels, gz)
        out[split] = (torch.from_numpy(upright).float().div(255).unsqueeze(1), labels)
    return out


MNIST_NAMES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)  # fmt: skip
EMNIST_NAMES = tuple(
    f"emnist-letters-{s}-{k}-ubyte"
    for s in ("train", "test")
    for k in ("images-idx3", "labels-idx1")
)
TORCHVISION = [  # name, torchvision class (its folder), file names, stored transposed
    ("fashion-mnist", "FashionMNIST", MNIST_NAMES, False),
    ("kmnist", "KMNIST", MNIST_NAMES, False),
    ("emnist-letters", "EMNIST", EMNIST_NAMES, True),
]


@pytest.mark.parametrize("name, cls, names, transposed", TORCHVISION)
def test_torchvision_sets_read_back_what_was_written_upright(
    tmp_path, name, cls, names, transposed
):
    written = idx_set(tmp_path / cls / "raw", names, transposed)
    data = load_data(DataConfig(name, "gray", data_dir=str(tmp_path)))
    assert torch.equal(data.train, written["train"][0])
    assert torch.equal(data.test, written["test"][0])
    assert data.test_labels.tolist() == written["test"][1].tolist()
    assert data.train[0, 0, 0].eq(1).all() and (data.name, data.encoding) == (name, "gray")
    static = load_data(DataConfig(name, "static", data_dir=str(tmp_path), seed=1))
    assert set(static.train.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(
        static.train, load_data(DataConfig(name, "static", data_dir=str(tmp_path), seed=1)).train
    )


@pytest.mark.parametrize("name, cls, names, transposed", TORCHVISION)
def test_files_that_are_there_are_read_to_torchvisions_tensors_without_importing_it(
    tmp_path, name, cls, names, transposed
):
    import torchvision.datasets

    idx_set(tmp_path / cls / "raw", names, transposed)
    train, test, test_labels, train_labels = IMAGE_SETS.build(name, tmp_path)
    split = {"split": "letters"} if cls == "EMNIST" else {}
    for ours, labels, is_train in ((train, train_labels, True), (test, test_labels, False)):
        theirs = getattr(torchvision.datasets, cls)(str(tmp_path), train=is_train, **split)
        images = theirs.data.transpose(1, 2) if transposed else theirs.data
        assert torch.equal(ours[:, 0], images.float().div(255))
        assert torch.equal(labels, theirs.targets) and labels.dtype == theirs.targets.dtype
    code = (
        "import sys; from pathlib import Path; from ppl_vae.images import IMAGE_SETS; "
        f"IMAGE_SETS.build({name!r}, Path({str(tmp_path)!r})); "
        "print('torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_emnist_is_turned_upright_where_torchvision_keeps_the_files_transposed(tmp_path):
    from torchvision.datasets import EMNIST

    written = idx_set(tmp_path / "EMNIST" / "raw", EMNIST_NAMES, transposed=True)
    raw = EMNIST(str(tmp_path), split="letters", train=False).data  # as the files hold them
    assert torch.equal(raw.float().div(255), written["test"][0][:, 0].transpose(1, 2))
    data = load_data(DataConfig("emnist-letters", "gray", data_dir=str(tmp_path)))
    assert torch.equal(data.test[:, 0], raw.transpose(1, 2).float().div(255))


def test_gzipped_files_are_read_offline_whatever_their_checksums_and_nothing_is_written(
    tmp_path, monkeypatch
):
    from torchvision.datasets import KMNIST

    raw = tmp_path / "KMNIST" / "raw"
    written = idx_set(raw, MNIST_NAMES, gz=True)  # not the official files: other checksums
    official = {name: md5 for name, md5 in KMNIST.resources}
    assert all(
        hashlib.md5((raw / f"{n}.gz").read_bytes()).hexdigest() != official[f"{n}.gz"]
        for n in MNIST_NAMES
    )
    monkeypatch.setattr(KMNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    before = sorted(p.name for p in raw.iterdir())
    data = load_data(DataConfig("kmnist", "gray", data_dir=str(tmp_path)))
    assert torch.equal(data.train, written["train"][0])
    assert torch.equal(data.test, written["test"][0])
    assert torch.equal(data.test_labels, torch.from_numpy(written["test"][1]).long())
    assert sorted(p.name for p in raw.iterdir()) == before  # nothing unpacked beside them
    # a mix: one file unpacked, the others still gzipped
    (raw / MNIST_NAMES[0]).write_bytes(gzip.decompress((raw / f"{MNIST_NAMES[0]}.gz").read_bytes()))
    (raw / f"{MNIST_NAMES[0]}.gz").unlink()
    mixed = load_data(DataConfig("kmnist", "gray", data_dir=str(tmp_path)))
    assert torch.equal(mixed.train, written["train"][0])


def test_a_truncated_or_foreign_gzipped_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    idx_set(raw, MNIST_NAMES, gz=True)
    gz = raw / f"{MNIST_NAMES[2]}.gz"
    body = gzip.decompress(gz.read_bytes())
    gz.write_bytes(gzip.compress(body[:-10]))  # whole gzip, truncated IDX
    with pytest.raises(
        InputError, match=rf"t10k-images-idx3-ubyte.gz has {len(body) - 10} bytes unpacked, not"
    ):
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))
    gz.write_bytes(gzip.compress(body)[:-20])  # the gzip itself cut short
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte.gz is not a whole gzip file"):
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))
    gz.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(InputError, match="is not a whole gzip file"):
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))


@pytest.mark.parametrize("name, cls, names, transposed", TORCHVISION)
def test_missing_files_say_where_to_put_them_and_leave_nothing_behind(
    tmp_path, monkeypatch, name, cls, names, transposed
):
    import torchvision.datasets

    dataset = getattr(torchvision.datasets, cls)
    monkeypatch.setattr(dataset, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    monkeypatch.setattr(dataset, "url", "http://127.0.0.1:9/gzip.zip", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        load_data(DataConfig(name, data_dir=str(tmp_path / "typo")))
    message = str(e.value)
    assert str(tmp_path / "typo" / cls / "raw") in message and "PPL_VAE_DATA" in message
    assert all(n in message for n in names) and "\n" not in message
    assert not (tmp_path / "typo").exists()


def test_a_truncated_or_foreign_idx_file_is_named(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    idx_set(raw, MNIST_NAMES)
    body = (raw / MNIST_NAMES[2]).read_bytes()
    (raw / MNIST_NAMES[2]).write_bytes(body[:-10])
    size = len(body) - 10
    with pytest.raises(
        InputError, match=rf"t10k-images-idx3-ubyte has {size} bytes, not the {len(body)}"
    ):
        load_data(DataConfig("fashion-mnist", data_dir=str(tmp_path)))
    (raw / MNIST_NAMES[2]).write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(InputError, match="is not an IDX file"):
        load_data(DataConfig("fashion-mnist", data_dir=str(tmp_path)))


def omniglot_file(tmp_path, n_train=6, n_test=4, alphabets=50, seed=0):
    """A chardata.mat as Burda et al.'s: (784, N) columns, each an image in Fortran order."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    upright = {s: rng.random((n, 28, 28)) for s, n in (("train", n_train), ("test", n_test))}
    for u in upright.values():
        u[:, :3, :] = 1.0  # a bar along the top
    labels = {s: rng.integers(0, alphabets, n) for s, n in (("train", n_train), ("test", n_test))}
    columns = {s: u.reshape(len(u), 784, order="F").T for s, u in upright.items()}
    one_hot = {s: np.eye(alphabets)[k].T for s, k in labels.items()}
    path = tmp_path / "OMNIGLOT" / "chardata.mat"
    path.parent.mkdir(parents=True)
    savemat(path, {"data": columns["train"], "testdata": columns["test"],
                   "target": one_hot["train"], "testtarget": one_hot["test"]})  # fmt: skip
    return upright, labels, columns


def test_omniglot_reads_burdas_columns_upright_with_the_alphabets(tmp_path):
    upright, labels, columns = omniglot_file(tmp_path)
    data = load_data(DataConfig("omniglot", "gray", data_dir=str(tmp_path)))
    assert data.train.shape == (6, 1, 28, 28) and data.test.shape == (4, 1, 28, 28)
    assert torch.equal(data.train[:, 0], torch.from_numpy(upright["train"]).float())
    assert torch.equal(data.test[:, 0], torch.from_numpy(upright["test"]).float())
    assert data.test_labels.tolist() == labels["test"].tolist()
    # the IWAE code's reading: data.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F"), rows
    # of which are the images row by row
    iwae = columns["test"].T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")
    assert np.allclose(data.test.flatten(1).numpy(), iwae)


def test_omniglot_missing_or_foreign_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_data(DataConfig("omniglot", data_dir=str(tmp_path)))
    message = str(e.value)
    assert str(tmp_path / "OMNIGLOT" / "chardata.mat") in message and "yburda/iwae" in message
    assert "\n" not in message and not (tmp_path / "OMNIGLOT").exists()
    from scipy.io import savemat

    (tmp_path / "OMNIGLOT").mkdir()
    savemat(tmp_path / "OMNIGLOT" / "chardata.mat", {"data": np.zeros((784, 3))})
    with pytest.raises(InputError, match="has no 'testdata', 'testtarget': it is not chardata"):
        load_data(DataConfig("omniglot", data_dir=str(tmp_path)))
    (tmp_path / "OMNIGLOT" / "chardata.mat").write_bytes(b"not a mat file")
    with pytest.raises(InputError, match="cannot read Omniglot from"):
        load_data(DataConfig("omniglot", data_dir=str(tmp_path)))


def test_digits_are_scikit_learns_scaled_and_split_once_for_all_seeds():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = load_data(DataConfig("digits", "gray", seed=5))
    assert data.train.shape == (1437, 1, 8, 8) and data.test.shape == (360, 1, 8, 8)
    both = torch.cat([data.train, data.test]).flatten(1).double().mul(16).numpy()
    assert np.array_equal(both, np.round(both))  # 0..16 scaled by 1/16
    rows = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    assert np.array_equal(rows(both), rows(bunch.data))  # every image once
    pairs = {(row.tobytes(), int(k)) for row, k in zip(bunch.data, bunch.target, strict=True)}
    test = data.test.flatten(1).double().mul(16).numpy()
    assert all(
        (r.tobytes(), k) in pairs for r, k in zip(test, data.test_labels.tolist(), strict=True)
    )
    assert torch.equal(load_data(DataConfig("digits", "gray", seed=0)).test, data.test)
    assert torch.cat([data.train, data.test]).mean().item() == pytest.approx(bunch.data.mean() / 16)


def test_every_image_set_is_a_dataset_choice_listed_with_its_folder_in_help(capsys):
    assert set(IMAGE_SETS) == {
        "mnist",
        "fashion-mnist",
        "kmnist",
        "emnist-letters",
        "omniglot",
        "digits",
    }
    assert set(IMAGE_SETS) <= set(DATASETS)
    code, out, _ = run_cli("train", "--help", capsys=capsys)
    text = " ".join(out.split())
    assert code == 0
    for where in ("DIR/MNIST/raw", "DIR/FashionMNIST/raw", "DIR/KMNIST/raw", "DIR/EMNIST/raw",
                  "DIR/OMNIGLOT/chardata.mat", "load_digits", "pinwheel"):  # fmt: skip
        assert where in text


def test_a_missing_set_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli("train", "--dataset", "omniglot", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "run"), capsys=capsys)  # fmt: skip
    assert code == 2 and "OMNIGLOT/chardata.mat" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_digits_train_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["--dataset", "digits", "--latent-dim", "4", "--epochs", "2", "--batch-size", "100"]
    code, _, err = run_cli("train", *args, "--quiet", "--out", str(out), capsys=capsys)
    assert code == 0, err
    first, second = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # an untrained VAE, p(x|z) = Bernoulli(1/2) per pixel, scores 64 ln 2 = 44.4 nats; two
    # epochs reach about 28
    assert -40 < second["test_elbo"] < -15 and second["test_elbo"] > first["test_elbo"]
    assert (out / "samples.png").is_file()
