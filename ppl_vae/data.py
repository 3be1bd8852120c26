r"""Data sets held as one tensor on the training device and batched by index."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from ppl_vae.config import check_positive, check_positive_value, check_seed, option
from ppl_vae.errors import InputError, MissingInputError
from ppl_vae.registry import Registry

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "Data",
    "DataConfig",
    "SYNTHETIC",
    "data_fingerprint",
    "load_data",
    "load_mnist",
    "resolve_data_root",
    "synthetic_2d",
]

Binarization = Literal["dynamic", "static", "gray"]
BINARIZATIONS: tuple[str, ...] = get_args(Binarization)
SYNTHETIC: Registry = Registry("synthetic data set")  # (n, generator) -> (points, labels)


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and how to encode it."""

    dataset: str = option(
        "mnist", "mnist, pinwheel, moons, ring8, or a .pt/.npy file holding an (N, ...) tensor",
        flags=("--dataset",), metavar="NAME|FILE",
    )  # fmt: skip
    binarize: Binarization = option(
        "dynamic", "MNIST encoding: a fresh Bernoulli draw per batch, one fixed draw, or gray "
        "intensities; ignored by continuous data", choices=BINARIZATIONS,
    )  # fmt: skip
    data_dir: str | None = option(
        None, "folder holding MNIST/raw (default: $PPL_VAE_DATA, else ~/.cache/ppl_vae)"
    )
    seed: int = option(0, "seeds the static binarization, synthetic draws and file splits")
    num_train: int = option(10_000, "points drawn for a synthetic training set")
    num_test: int = option(2_000, "points drawn for a synthetic test set")

    def __post_init__(self):
        if self.binarize not in BINARIZATIONS:
            raise InputError(
                f"unknown binarization {self.binarize!r}; choose one of {', '.join(BINARIZATIONS)}"
            )
        check_positive(self, "num_train", "num_test")
        check_seed("seed", self.seed)
        if not (self.dataset in DATASETS or Path(self.dataset).suffix in (".pt", ".npy")):
            raise InputError(
                f"unknown data set {self.dataset!r}; choose one of {', '.join(DATASETS)} "
                f"or give a .pt/.npy file"
            )


class Data:
    r"""A train/test pair of tensors on one device, batched by index.

    ``train`` and ``test`` hold intensities in [0, 1] for ``dynamic`` binarization (a fresh
    Bernoulli draw is taken each time a batch is used), binary values for ``static``, and the raw
    values otherwise.

    Arguments:
        train: Training tensor of shape ``(N, *event_shape)``.
        test: Test tensor of shape ``(M, *event_shape)``.
        encoding: ``"dynamic"``, ``"static"``, ``"gray"`` or ``"continuous"``.
        name: A name for messages and plots.
    """

    def __init__(
        self,
        train: Tensor,
        test: Tensor,
        encoding: str,
        name: str = "data",
        test_labels: Tensor | None = None,
        validation: Tensor | None = None,
    ):
        train, test = train.detach(), test.detach()  # saved with requires_grad, or Parameters
        for split, t in (("train", train), ("test", test)):
            if not torch.is_floating_point(t):
                raise InputError(
                    f"{name} {split} data must be a floating-point tensor, got {t.dtype}"
                )
            if not torch.isfinite(t).all():
                raise InputError(
                    f"{name} {split} data contain NaN or infinite values; clean or drop those rows"
                )
            if t.dim() < 2 or t.shape[0] == 0:
                raise InputError(
                    f"{name} {split} data must have shape (N, ...) with N > 0, got {tuple(t.shape)}"
                )
            if t.shape[1:].numel() == 0:
                raise InputError(
                    f"{name} {split} data have no features: shape {tuple(t.shape)}; each point "
                    f"needs at least one value, e.g. an (N, D) array with D >= 1"
                )
        if train.shape[1:] != test.shape[1:]:
            raise InputError(
                f"{name} train and test shapes differ: {tuple(train.shape[1:])} "
                f"vs {tuple(test.shape[1:])}"
            )
        if encoding == "dynamic" and ((train < 0).any() or (train > 1).any()):
            raise InputError(f"{name}: dynamic binarization needs values in [0, 1]")
        if test_labels is not None and test_labels.shape != test.shape[:1]:
            raise InputError(
                f"{name}: {tuple(test_labels.shape)} test labels for {test.shape[0]} test points"
            )
        self.train, self.test, self.encoding, self.name = train, test, encoding, name
        self.test_labels = test_labels  # a class per test point (digits, arms), for pictures
        self.validation = validation  # training points held out (hold_out), or None

    @property
    def event_shape(self) -> torch.Size:
        return self.train.shape[1:]

    @property
    def is_image(self) -> bool:
        return len(self.event_shape) == 3

    @functools.cached_property
    def is_binary(self) -> bool:
        """Whether every value the model sees is 0 or 1 (scanned once; the tensors are fixed)."""
        if self.encoding in ("dynamic", "static"):
            return True
        return all(bool(((t == 0) | (t == 1)).all()) for t in (self.train, self.test))

    @property
    def device(self) -> torch.device:
        return self.train.device

    def to(self, device: torch.device | str) -> Data:
        labels = self.test_labels
        held = self.validation.to(device) if self.validation is not None else None
        return Data(
            self.train.to(device), self.test.to(device), self.encoding, self.name, labels, held
        )

    def hold_out(self, num: int, seed: int) -> Data:
        """``num`` training points, drawn at random from ``seed``, as the validation set; the
        rest, in their order, as the training set.

        The draw is made on the CPU, so the split is the same on every device and process.

        Example:
            >>> data = Data(torch.arange(10.0).view(10, 1), torch.rand(3, 1), "continuous")
            >>> split = data.hold_out(3, seed=0)
            >>> split.train.shape[0], split.validation.shape[0]
            (7, 3)
            >>> sorted(split.train.view(-1).tolist() + split.validation.view(-1).tolist())[:4]
            [0.0, 1.0, 2.0, 3.0]
        """
        n = self.train.shape[0]
        if not 0 < num < n:
            raise InputError(
                f"--validation {num} must leave training points: the training set of "
                f"{self.name} has {n}; pass --validation below {n}, or 0 for none"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, kept = order[:num].sort().values, order[num:].sort().values
        device = self.train.device
        return Data(
            self.train[kept.to(device)], self.test, self.encoding, self.name, self.test_labels,
            self.train[held.to(device)],
        )  # fmt: skip

    def head(self, num_train: int | None = None, num_test: int | None = None) -> Data:
        """The first ``num_train`` training and ``num_test`` test points (all where ``None``),
        with their test labels, encoding and name: a smaller data set for quick runs.

        Example:
            >>> data = Data(torch.rand(10, 2), torch.rand(6, 2), "continuous",
            ...             test_labels=torch.arange(6))
            >>> small = data.head(4, 3)
            >>> small.train.shape[0], small.test_labels.tolist()
            (4, [0, 1, 2])
        """
        check_positive_value("num_train", num_train)
        check_positive_value("num_test", num_test)
        labels = self.test_labels[:num_test] if self.test_labels is not None else None
        train, test = self.train[:num_train], self.test[:num_test]
        return Data(train, test, self.encoding, self.name, labels)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Returns a batch as the model sees it (a fresh binarization for ``dynamic``)."""
        if self.encoding == "dynamic":
            return torch.bernoulli(x, generator=generator)
        return x

    def batches(
        self,
        batch_size: int,
        split: Literal["train", "test"] = "train",
        shuffle: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yields encoded batches that cover the split once (the last one may be smaller).

        The permutation and the dynamic binarization are drawn from ``generator`` (on the data's
        device), so a saved generator state reproduces an epoch exactly.
        """
        x = self.train if split == "train" else self.test
        n = x.shape[0]
        if shuffle:
            order = torch.randperm(n, generator=generator, device=x.device)
            for start in range(0, n, batch_size):
                yield self.encode(x[order[start : start + batch_size]], generator)
        else:
            for start in range(0, n, batch_size):
                yield self.encode(x[start : start + batch_size], generator)


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The MNIST root: ``data_dir``, else ``$PPL_VAE_DATA``, else the user cache directory."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("PPL_VAE_DATA"):
        return Path(os.environ["PPL_VAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ppl_vae"


def load_mnist(root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """MNIST intensities in [0, 1] as ``(60000, 1, 28, 28)`` and ``(10000, 1, 28, 28)`` tensors.

    The files are read with ``torchvision.datasets.MNIST`` from ``root`` (see
    :func:`resolve_data_root`) and downloaded only when they are absent.
    """
    train, test, _ = _mnist(root)
    return train, test


MNIST_FILES = {  # the uncompressed files torchvision reads, and their sizes in bytes
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}


def _mnist(root: str | os.PathLike | None) -> tuple[Tensor, Tensor, Tensor]:
    """Training and test images (intensities) and the test digits."""
    from torchvision.datasets import MNIST  # torchvision only when MNIST is asked for

    root = resolve_data_root(root)
    raw = root / "MNIST" / "raw"
    for name, size in MNIST_FILES.items():  # a truncated file is named, not "not found"
        path = raw / name
        if path.is_file() and path.stat().st_size != size:
            raise InputError(
                f"MNIST file {path} has {path.stat().st_size} bytes, not {size}: it is truncated "
                f"or corrupt; delete it (and its .gz) and fetch it again"
            )
    created = [d for d in (root, root / "MNIST", raw) if not d.exists()]
    splits = []
    for train in (True, False):
        try:
            ds = MNIST(str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = MNIST(str(root), train=train, download=True)
            except Exception as e:  # offline, unwritable, or a truncated download
                for d in reversed(created):  # a mistyped --data-dir leaves nothing behind
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise MissingInputError(
                    f"MNIST not found in {raw} and the download failed "
                    f"({type(e).__name__}); pass --data-dir DIR or set PPL_VAE_DATA=DIR, where "
                    f"DIR/MNIST/raw holds the four MNIST files"
                ) from None
        splits.append(ds.data.unsqueeze(1).float().div_(255.0))
    return splits[0], splits[1], ds.targets.clone()


@SYNTHETIC.register("pinwheel", help="five curved arms (Johnson et al. 2016)")
def pinwheel(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Five curved arms (Johnson et al. 2016): ``(n, 2)`` points and each one's arm."""
    g = generator
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.05, 0.25
    label = torch.randint(arms, (n,), generator=g)
    r = torch.randn(n, generator=g) * radial_std + 1.0
    t = torch.randn(n, generator=g) * tangential_std
    angle = label * (2 * math.pi / arms) + rate * torch.exp(r)
    pts = torch.stack([r, t], dim=1)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return 2.0 * (rot @ pts.unsqueeze(-1)).squeeze(-1), label


@SYNTHETIC.register("moons", help="two interleaved half circles")
def moons(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles with noise 0.1: ``(n, 2)`` points and each one's moon."""
    g = generator
    upper = torch.rand(n, generator=g) < 0.5
    t = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return pts + 0.1 * torch.randn(n, 2, generator=g), (~upper).long()


@SYNTHETIC.register("ring8", help="8 Gaussians (std 0.1) on a circle of radius 2")
def ring8(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """8 Gaussians (std 0.1) on a circle of radius 2: ``(n, 2)`` points and their components."""
    k = torch.randint(8, (n,), generator=generator)
    angle = k * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + 0.1 * torch.randn(n, 2, generator=generator), k


DATASETS: tuple[str, ...] = ("mnist", *SYNTHETIC)


def synthetic_2d(name: str, n: int, generator: torch.Generator) -> Tensor:
    r"""Draws ``n`` points of the synthetic 2-D data set ``name`` (see :data:`SYNTHETIC`)."""
    return SYNTHETIC.build(name, n, generator)[0]


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _load_file(path: Path, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A (N, ...) tensor from a .pt or .npy file, split 90/10 into train and test."""
    try:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            with warnings.catch_warnings():  # torch's note on checking sparse tensors
                warnings.simplefilter("ignore", UserWarning)
                x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read data file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise InputError(f"data file {path} must hold one tensor of shape (N, ...) with N >= 2")
    if x.layout != torch.strided:
        raise InputError(f"data file {path} holds a sparse tensor; save x.to_dense() instead")
    if x.is_complex():
        raise InputError(
            f"data file {path} holds complex values; save real ones (e.g. torch.view_as_real(x))"
        )
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in _INTEGERS):
        x = x.to(torch.int64) if x.dtype == torch.bool else x
    dtype = torch.get_default_dtype()  # the networks' dtype, whatever the file holds
    largest = x.abs().max().item() if x.numel() else 0.0
    if math.isfinite(largest) and largest > torch.finfo(dtype).max:
        raise InputError(
            f"data file {path} holds values up to {largest:.3g}, beyond {dtype}'s range "
            f"({torch.finfo(dtype).max:.3g}); rescale the data"
        )
    x = x.to(dtype)
    order = torch.randperm(x.shape[0], generator=generator)
    n_test = max(1, x.shape[0] // 10)
    return x[order[n_test:]], x[order[:n_test]]


def load_data(config: DataConfig, device: torch.device | str = "cpu") -> Data:
    """Loads the data set ``config`` names onto ``device``."""
    g = torch.Generator().manual_seed(config.seed)
    if config.dataset == "mnist":
        train, test, digits = _mnist(config.data_dir)
        if config.binarize == "static":
            train, test = torch.bernoulli(train, generator=g), torch.bernoulli(test, generator=g)
        return Data(train.to(device), test.to(device), config.binarize, "mnist", digits)
    if config.dataset in SYNTHETIC:
        train, _ = SYNTHETIC.build(config.dataset, config.num_train, g)
        test, labels = SYNTHETIC.build(config.dataset, config.num_test, g)
        return Data(train.to(device), test.to(device), "continuous", config.dataset, labels)
    path = Path(config.dataset)
    if not path.is_file():
        raise MissingInputError(f"data file {path} does not exist")
    train, test = _load_file(path, g)
    return Data(train.to(device), test.to(device), "continuous", path.stem)


def data_fingerprint(data: Data) -> str:
    """A SHA-256 hex digest of the training and test tensors: their dtypes, shapes and bytes.

    Equal data give equal fingerprints on every device; one changed value gives another. A run
    can record it and refuse to resume on a data file that changed since.

    Example:
        >>> a = Data(torch.zeros(4, 2), torch.ones(2, 2), "continuous")
        >>> b = Data(torch.zeros(4, 2), torch.ones(2, 2), "continuous", name="other")
        >>> data_fingerprint(a) == data_fingerprint(b)
        True
    """
    h = hashlib.sha256()
    for t in (data.train, data.test):
        h.update(f"{t.dtype} {tuple(t.shape)};".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return h.hexdigest()
