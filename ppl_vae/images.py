r"""Image data sets: MNIST, Fashion-MNIST, KMNIST and EMNIST letters in torchvision's layout,
Burda et al.'s 28x28 Omniglot (``chardata.mat``), and scikit-learn's bundled 8x8 digits.

Each loader in :data:`IMAGE_SETS` takes the data root (:func:`resolve_data_root`: ``--data-dir``,
else ``$PPL_VAE_DATA``, else the user cache) and returns the training and test images as
intensities in [0, 1] of shape ``(N, 1, H, W)``, upright, with the test labels (and, where the
set has them, the training labels as a fourth entry: the MNIST family, digits). A set whose
files are missing is a one-line error saying where to put them; nothing is written but what
torchvision's own download writes when the network allows. Where a torchvision set's four
uncompressed files are there, they are read here (:func:`read_idx`), to the same tensors as
torchvision's reader, and so are their .gz files, unpacked in memory (whatever their checksums);
torchvision is imported only to download them or unpack other archives.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ppl_vae.errors import InputError, MissingInputError
from ppl_vae.registry import Registry

__all__ = [
    "IMAGE_SETS",
    "MNIST_FILES",
    "TorchvisionSet",
    "check_idx_file",
    "read_idx",
    "resolve_data_root",
]

IMAGE_SETS: Registry = Registry("image data set")  # root -> (train, test, labels[, train's])
WHERE = "pass --data-dir DIR or set PPL_VAE_DATA=DIR"


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir``, else ``$PPL_VAE_DATA``, else the user cache directory."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("PPL_VAE_DATA"):
        return Path(os.environ["PPL_VAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ppl_vae"


MNIST_FILES = {  # the uncompressed files torchvision reads, and their sizes in bytes
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}


def _idx_shape(header: np.ndarray, size: int, path: Path) -> tuple[int, ...]:
    """The shape an IDX file of unsigned bytes of ``size`` bytes gives in its ``header`` (its
    first big-endian uint32 words); an error naming ``path`` if it is not a whole one."""
    ndim = int(header[0]) - 0x800 if len(header) else -1
    if not 1 <= ndim <= 3 or len(header) < 1 + ndim:
        raise InputError(
            f"{path} is not an IDX file of unsigned bytes (magic number 0x00000801-3); "
            f"delete it and fetch it again"
        )
    expected = 4 * (1 + ndim) + int(np.prod(header[1 : 1 + ndim], dtype=np.int64))
    if size != expected:
        unpacked = " unpacked" if path.suffix == ".gz" else ""
        raise InputError(
            f"{path} has {size} bytes{unpacked}, not the {expected} its header gives: it "
            f"is truncated or corrupt; delete it (and its .gz) and fetch it again"
        )
    return tuple(int(n) for n in header[1 : 1 + ndim])


def check_idx_file(path: Path) -> tuple[int, ...]:
    """The shape an IDX file of unsigned bytes gives in its header (the format of MNIST's
    files: a magic number 0x0000080D for D dimensions, D sizes, then the bytes); an error naming
    ``path`` if it is not a whole one."""
    return _idx_shape(np.fromfile(path, dtype=">u4", count=4), path.stat().st_size, path)


def read_idx(path: Path) -> Tensor:
    """An IDX file of unsigned bytes (checked by :func:`check_idx_file`), or one gzipped
    (``.gz``, unpacked in memory), as a uint8 tensor of the shape its header gives: what
    torchvision's MNIST reader returns for it, without importing torchvision (whose import takes
    longer than reading MNIST).
    """
    if path.suffix == ".gz":
        try:
            body = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8)
        except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
            raise InputError(
                f"{path} is not a whole gzip file ({e}); delete it and fetch it again"
            ) from None
        words = min(4, body.size // 4)
        shape = _idx_shape(body[: 4 * words].view(">u4"), body.size, path)
        return torch.from_numpy(body[4 * (1 + len(shape)) :].reshape(shape).copy())
    shape = check_idx_file(path)
    data = np.fromfile(path, dtype=np.uint8, offset=4 * (1 + len(shape)))
    return torch.from_numpy(data.reshape(shape))


@dataclass(frozen=True)
class TorchvisionSet:
    """An image set in the layout of a ``torchvision.datasets`` class, ``ROOT/<class>/raw``:
    read here when its files, or their .gz, are there; else by that class (which downloads them
    where the network allows, and unpacks what it downloads)."""

    title: str  # the set's name in messages
    cls: str  # the torchvision.datasets class, also its folder under the root
    files: tuple[str, ...]  # the uncompressed files torchvision reads
    fetch: str  # what else may stand in the folder: the archives torchvision downloads
    split: str | None = None  # EMNIST's split
    transposed: bool = False  # the files hold each image transposed (EMNIST)
    sizes: tuple[int, ...] | None = None  # the files' exact sizes, where known

    def __call__(self, root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raw = root / self.cls / "raw"
        for i, name in enumerate(self.files):  # a truncated file is named, not "not found"
            path = raw / name
            if path.is_file() and self.sizes and path.stat().st_size != self.sizes[i]:
                raise InputError(
                    f"{self.title} file {path} has {path.stat().st_size} bytes, not "
                    f"{self.sizes[i]}: it is truncated or corrupt; delete it (and its .gz) and "
                    f"fetch it again"
                )
        # Read here, without torchvision, each file or else its .gz: a .gz that is not the one
        # torchvision checksums would have it download the file again, which fails offline
        found = [raw / n if (raw / n).is_file() else raw / f"{n}.gz" for n in self.files]
        if all(path.is_file() for path in found):
            data = [read_idx(path) for path in found]  # each checked as it is read
            return self._tensors(data[0::2], data[1::2])
        for name in self.files:  # the files that are there, before torchvision reads them
            if (raw / name).is_file():
                check_idx_file(raw / name)
        created = [d for d in (root, root / self.cls, raw) if not d.exists()]
        images, labels = [], []
        for train in (True, False):
            try:
                ds = self._read(root, train, download=False)
            except RuntimeError:
                try:
                    ds = self._read(root, train, download=True)
                except Exception as e:  # offline, unwritable, or a truncated download
                    for d in reversed(created):  # a mistyped --data-dir leaves nothing behind
                        with contextlib.suppress(OSError):
                            d.rmdir()
                    raise MissingInputError(
                        f"{self.title} not found in {raw} and the download failed "
                        f"({type(e).__name__}); {WHERE}, where DIR/{self.cls}/raw holds "
                        f"{', '.join(self.files)} ({self.fetch})"
                    ) from None
            images.append(ds.data)
            labels.append(ds.targets)
        return self._tensors(images, labels)

    def _tensors(self, images: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, ...]:
        """(train, test) uint8 images and labels -> the loader's four tensors."""
        x = [im.transpose(1, 2) if self.transposed else im for im in images]
        x = [im.unsqueeze(1).float().div_(255.0) for im in x]
        return x[0], x[1], labels[1].to(torch.long, copy=True), labels[0].to(torch.long, copy=True)

    def _read(self, root: Path, train: bool, download: bool):
        import torchvision.datasets  # torchvision only when one of its sets is asked for

        split = {"split": self.split} if self.split else {}
        cls = getattr(torchvision.datasets, self.cls)
        return cls(str(root), train=train, download=download, **split)


def _idx_names(prefix: str = "", train: str = "train", test: str = "t10k") -> tuple[str, ...]:
    return tuple(
        f"{prefix}{split}-{kind}-ubyte"
        for split in (train, test)
        for kind in ("images-idx3", "labels-idx1")
    )


MNIST_LIKE = "or the four .gz files torchvision downloads"
IMAGE_SETS.register(
    "mnist",
    TorchvisionSet(
        "MNIST", "MNIST", tuple(MNIST_FILES), MNIST_LIKE, sizes=(*MNIST_FILES.values(),)
    ),
    help="LeCun et al.'s handwritten digits (torchvision MNIST), DIR/MNIST/raw holding "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (or the .gz files torchvision downloads)",
)
IMAGE_SETS.register(
    "fashion-mnist",
    TorchvisionSet("Fashion-MNIST", "FashionMNIST", _idx_names(), MNIST_LIKE),
    help="Zalando's clothes (Xiao et al. 2017; torchvision FashionMNIST), DIR/FashionMNIST/raw "
    "holding files named as MNIST's",
)
IMAGE_SETS.register(
    "kmnist",
    TorchvisionSet("KMNIST", "KMNIST", _idx_names(), MNIST_LIKE),
    help="Kuzushiji-MNIST, cursive Japanese (Clanuwat et al. 2018; torchvision KMNIST), "
    "DIR/KMNIST/raw holding files named as MNIST's",
)
IMAGE_SETS.register(
    "emnist-letters",
    TorchvisionSet(
        "EMNIST letters", "EMNIST", _idx_names("emnist-letters-", "train", "test"),
        "or NIST's gzip.zip, which torchvision unpacks", split="letters", transposed=True,
    ),
    help="handwritten letters, labels 1-26 (Cohen et al. 2017; torchvision EMNIST, split "
    "letters; the files' transposed images turned upright), DIR/EMNIST/raw holding "
    "emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte (or NIST's gzip.zip)",
)  # fmt: skip


@IMAGE_SETS.register(
    "omniglot",
    help="Burda et al.'s 28x28 Omniglot, labels the 50 alphabets (chardata.mat of "
    "github.com/yburda/iwae, datasets/OMNIGLOT), DIR/OMNIGLOT/chardata.mat",
)
def omniglot(root: Path) -> tuple[Tensor, Tensor, Tensor]:
    """Burda et al.'s (2016) 28x28 Omniglot: 24,345 training and 8,070 test characters.

    ``chardata.mat`` holds ``data`` and ``testdata`` as (784, N) intensities, each column an
    image in column-major (Fortran) order, and ``target``/``testtarget`` as (50, N) one-hot
    alphabets; the labels returned are the alphabets, 0-49.
    """
    path = root / "OMNIGLOT" / "chardata.mat"
    if not path.is_file():
        raise MissingInputError(
            f"Omniglot not found: no {path}; {WHERE}, where DIR/OMNIGLOT/chardata.mat is "
            f"Burda et al.'s file (github.com/yburda/iwae, datasets/OMNIGLOT/chardata.mat)"
        )
    from scipy.io import loadmat  # scipy comes with scikit-learn

    try:
        mat = loadmat(str(path))
    except Exception as e:  # not a .mat file
        raise InputError(f"cannot read Omniglot from {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("data", "testdata", "testtarget") if k not in mat]
    if missing:
        raise InputError(f"{path} has no {', '.join(map(repr, missing))}: it is not chardata.mat")
    images = [_columns_to_images(mat[k], path, k) for k in ("data", "testdata")]
    labels = np.asarray(mat["testtarget"])
    if labels.ndim != 2 or labels.shape[1] != images[1].shape[0]:
        raise InputError(
            f"{path}: 'testtarget' has shape {labels.shape}, not (alphabets, "
            f"{images[1].shape[0]}) one-hot columns for the test images"
        )
    return images[0], images[1], torch.from_numpy(labels.argmax(0)).long()


def _columns_to_images(a, path: Path, key: str) -> Tensor:
    """(784, N) columns in Fortran order -> upright (N, 1, 28, 28) float images."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != 784 or a.shape[1] == 0:
        raise InputError(f"{path}: {key!r} has shape {a.shape}, not (784, N) image columns")
    x = torch.from_numpy(np.ascontiguousarray(a.T, dtype=np.float32))  # row i: column i
    x = x.reshape(-1, 28, 28).transpose(1, 2)  # column-major pixels: rows are x's columns
    if x.min() < 0 or x.max() > 1:
        raise InputError(f"{path}: {key!r} holds values outside [0, 1]; it is not chardata.mat")
    return x.unsqueeze(1).contiguous()


DIGITS_TEST = 360  # of 1,797: a fifth, drawn once (scikit-learn's train_test_split, seed 0)


@IMAGE_SETS.register(
    "digits",
    help="scikit-learn's bundled 8x8 digits (load_digits; no files): 1,437 training and 360 "
    "test images, a fixed split",
)
def digits(root: Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits (UCI), 0..16 scaled to [0, 1], split once and for all
    by ``train_test_split(test_size=360, random_state=0)`` whatever the run's seed, so every
    run is tested on the same 360 images. ``root`` is unused: the data come with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1)
    train, test = train_test_split(np.arange(len(x)), test_size=DIGITS_TEST, random_state=0)
    labels = torch.from_numpy(bunch.target).long()
    return x[train], x[test], labels[test], labels[train]
