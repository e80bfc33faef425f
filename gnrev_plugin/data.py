"""Datasets: MNIST-format IDX files, MNIST-1D and a synthetic teacher-student task.

Nothing here downloads anything. MNIST (or Fashion-MNIST, or any MNIST-format set) is read from a
directory of IDX files:

* ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]`` (optional) and
* ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``

(``-`` or ``.`` before ``idx``, gzipped or not, any image size). With both pairs, ``train-*`` is the
training set and ``t10k-*`` the test set. With only the ``t10k-*`` pair (what the shared machines
hold: the real 10k MNIST test split), the first images train and the last ones test: 8,000 / 2,000
for a 10,000-image file, else an 80 % / 20 % split.

The default directory is ``$GNREV_DATA_DIR`` if set, else ``../shared/data/mnist`` beside the
repository root (then beside the current directory).

Normalisation (the paper's protocol): ``x ↦ (x/255 − 0.1307)/0.3081`` for MNIST; ``"standardize"``
uses the training set's own pixel mean and std (e.g. Fashion-MNIST); ``"none"`` gives ``x/255``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset", "MNIST_MEAN", "MNIST_STD", "DATA_DIR_ENV", "default_data_dir", "find_idx_files",
    "read_idx", "load_idx_dataset", "load_mnist1d", "teacher_student", "load_dataset",
    "full_batch_subset", "one_hot", "pad_to_multiple", "pad_to_even", "epoch_permutation", "minibatches",
    "DATASETS", "DataError", "DataWarning", "MNIST_MD5",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DATA_DIR_ENV = "GNREV_DATA_DIR"
#: Names accepted by :func:`load_dataset`.
DATASETS = ("mnist", "fashion-mnist", "mnist1d", "teacher-student")

#: ``(size, MD5)`` of the *decompressed* official MNIST files (``../shared/data/mnist/README.md``),
#: checked when a file of that name and size is read as ``mnist``; a mismatch is a
#: :class:`DataWarning` (subsets and other MNIST-format sets have other sizes and are not checked).
MNIST_MD5 = {"t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
             "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637")}


class DataError(ValueError):
    """A data file that cannot be used (corrupt, truncated, inconsistent); the message names it."""


class DataWarning(UserWarning):
    """A data file that is usable but not the one its name promises (checksum mismatch)."""


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    """A classification dataset held in memory as tensors.

    ``x_*`` are float tensors ``(n, d)`` (flattened, normalised), ``y_*`` long class indices.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    info: dict = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def describe(self) -> str:
        src = f" from {self.info['source']}" if "source" in self.info else ""
        return (f"{self.name}{src}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"d={self.in_features}, {self.num_classes} classes")


# ---------------------------------------------------------------------------------- IDX files
def default_data_dir() -> Path:
    """``$GNREV_DATA_DIR``, else the first existing ``../shared/data/mnist`` candidate.

    Candidates: beside the repository root (``<repo>/../shared/data/mnist``), then beside the
    current directory. If none exists the first candidate is returned (errors then name it).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / "shared" / "data" / "mnist",
                  Path.cwd().parent / "shared" / "data" / "mnist",
                  Path.cwd() / "shared" / "data" / "mnist"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def _expected_files_message(data_dir: Path) -> str:
    return (f"no MNIST-format IDX files found in {data_dir}. Expected "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (the test pair; split into "
            "train/test when alone), optionally with train-images-idx3-ubyte.gz and "
            "train-labels-idx1-ubyte.gz (gzipped or not). Pass --data-dir DIR or set "
            f"${DATA_DIR_ENV}. Nothing is downloaded.")


def find_idx_files(data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Locate the ``train`` and ``t10k`` (images, labels) pairs in ``data_dir``.

    Returns a dict with keys among ``"train"``, ``"t10k"``.

    Raises:
        FileNotFoundError: if the directory or the ``t10k`` pair is missing (the message names
            the expected files), or a pair is incomplete.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(_expected_files_message(data_dir) + " (the directory does not "
                                "exist)")
    names = {p.name: p for p in data_dir.iterdir() if p.is_file()}
    pairs: dict[str, tuple[Path, Path]] = {}
    for prefix in ("train", "t10k"):
        found = {}
        for kind, nd in (("images", 3), ("labels", 1)):
            pat = re.compile(rf"^{prefix}-{kind}[-.]idx{nd}-ubyte(\.gz)?$")
            hits = sorted(n for n in names if pat.match(n))
            if hits:
                found[kind] = names[hits[0]]
        if len(found) == 1:
            (kind, path), = found.items()
            missing = "labels" if kind == "images" else "images"
            raise FileNotFoundError(f"{path} has no matching {prefix}-{missing}-idx"
                                    f"{1 if missing == 'labels' else 3}-ubyte[.gz] in {data_dir}")
        if len(found) == 2:
            pairs[prefix] = (found["images"], found["labels"])
    if "t10k" not in pairs and "train" not in pairs:
        raise FileNotFoundError(_expected_files_message(data_dir))
    return pairs


def read_idx(path: str | Path, *, md5: tuple[int, str] | None = None) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz``) into a numpy array.

    Format: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    int32, then the data in C order: the file holds exactly
    :math:`4 + 4 n_\\text{dim} + \\prod_k d_k \\cdot \\text{itemsize}` bytes.

    Args:
        path: the file.
        md5: ``(size, MD5)`` expected of the decompressed bytes; a file of that size with
            another MD5 gives a :class:`DataWarning` naming the file (other MNIST-format data is
            legitimate).

    Returns:
        The array, of the header's shape and dtype.

    Raises:
        DataError: a corrupt or truncated gzip stream, a bad magic number, or a size that
            disagrees with the header (each naming the file).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({type(err).__name__}: "
                        f"{err}); copy or download it again (`gzip -t {path.name}` checks "
                        "it)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is truncated: its header declares {ndim} dimensions but the "
                        f"file has {len(raw)} bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=object)) if dims else 1
    if len(raw) - offset != count * dtype.itemsize:
        what = "truncated" if len(raw) - offset < count * dtype.itemsize else "too long"
        raise DataError(f"{path} is {what}: header says {dims} of {dtype.name} "
                        f"({count * dtype.itemsize} data bytes), file has {len(raw) - offset}")
    if md5 is not None and len(raw) == md5[0] and (got := hashlib.md5(raw).hexdigest()) != md5[1]:
        warnings.warn(f"{path}: MD5 {got} of the decompressed data differs from the official "
                      f"file's {md5[1]}; using it anyway (other MNIST-format data?)", DataWarning,
                      stacklevel=2)
    try:
        return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    except ValueError as err:       # e.g. (0, 2**31 - 1, 2**31 - 1): no data, impossible shape
        raise DataError(f"{path} declares an impossible shape {dims}: {err}") from None


def _idx_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").replace(".idx", "-idx")


def _read_pair(images: Path, labels: Path, num_classes: int, check_md5: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    x, y = (read_idx(p, md5=MNIST_MD5.get(_idx_stem(p)) if check_md5 else None)
            for p in (images, labels))
    if x.ndim < 1 or y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{labels.name} must hold a 1-D integer array of labels and {images.name} "
                        f"at least 1-D images, got {y.dtype.name} {y.shape} and {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{images.name} has {x.shape[0]} images but {labels.name} has "
                        f"{y.shape[0]} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{labels.name} has labels in [{int(y.min())}, {int(y.max())}], outside "
                        f"[0, {num_classes}) for the declared {num_classes} classes (pass "
                        "num_classes=K, e.g. --data-opt num_classes=K, for another dataset)")
    return x.reshape(x.shape[0], -1), y.astype(np.int64)


def _normalise(x: np.ndarray, x_train: np.ndarray, normalization: str) -> torch.Tensor:
    x = x.astype(np.float32) / 255.0
    if normalization == "mnist":
        x = (x - MNIST_MEAN) / MNIST_STD
    elif normalization == "standardize":
        ref = x_train.astype(np.float32) / 255.0
        x = (x - ref.mean()) / max(float(ref.std()), 1e-12)
    elif normalization != "none":
        raise ValueError(f"normalization must be 'mnist', 'standardize' or 'none', "
                         f"got {normalization!r}")
    return torch.from_numpy(np.ascontiguousarray(x))


def load_idx_dataset(
    data_dir: str | Path | None = None,
    normalization: str = "mnist",
    train_size: int | None = None,
    test_size: int | None = None,
    name: str = "mnist",
    num_classes: int = 10,
) -> Dataset:
    """Load an MNIST-format IDX directory (see the module docstring for the file layout).

    Args:
        data_dir: the directory (default :func:`default_data_dir`).
        normalization: ``"mnist"`` (``(x/255 − 0.1307)/0.3081``), ``"standardize"`` or ``"none"``.
        train_size: keep the first ``train_size`` training images (default: all; with only the
            ``t10k`` pair of 10,000 images, 8,000).
        test_size: keep the first (last, for a split ``t10k`` file) ``test_size`` test images.
        name: the dataset name recorded in the result (``"mnist"`` also checks the official
            files' :data:`MNIST_MD5`, warning on a mismatch).
        num_classes: the declared number of classes; every label must lie in
            ``[0, num_classes)`` (:class:`DataError` otherwise).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for key, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{key} must be a positive int, got {size!r}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    pairs = find_idx_files(data_dir)
    if "train" in pairs and "t10k" in pairs:
        x_tr, y_tr = _read_pair(*pairs["train"], num_classes, name == "mnist")
        x_te, y_te = _read_pair(*pairs["t10k"], num_classes, name == "mnist")
        if train_size is not None:
            x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]
        if test_size is not None:
            x_te, y_te = x_te[:test_size], y_te[:test_size]
        split = "train/t10k files"
    else:
        (prefix, pair), = pairs.items()
        x, y = _read_pair(*pair, num_classes, name == "mnist")
        n = len(y)
        n_test = test_size if test_size is not None else (2000 if n == 10000 else n // 5)
        n_train = train_size if train_size is not None else n - n_test
        if n_train < 1 or n_test < 1 or n_train + n_test > n:
            raise ValueError(f"cannot split {n} images of {pair[0].name} into {n_train} train "
                             f"and {n_test} test images")
        x_tr, y_tr = x[:n_train], y[:n_train]
        x_te, y_te = x[n - n_test:], y[n - n_test:]
        split = f"{prefix} file split: first {n_train} train, last {n_test} test"
    return Dataset(name, _normalise(x_tr, x_tr, normalization), torch.from_numpy(y_tr.copy()),
                   _normalise(x_te, x_tr, normalization), torch.from_numpy(y_te.copy()),
                   num_classes, info=dict(source=idx_source(pairs), split=split,
                                          normalization=normalization))


def idx_source(pairs: dict[str, tuple[Path, Path]]) -> str:
    """How a run records its IDX data: the folder's name and the SHA-256 of its files (names
    sorted), never the machine's absolute path, e.g. ``"mnist (sha256 1a2b…)"``.

    Args:
        pairs: :func:`find_idx_files`' answer.

    Returns:
        ``"<folder name> (sha256 <first 16 hex digits>)"``.
    """
    files = sorted({f for pair in pairs.values() for f in pair}, key=lambda f: f.name)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{files[0].parent.name} (sha256 {digest.hexdigest()[:16]})"


# ---------------------------------------------------------------------------------- MNIST-1D
def load_mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> Dataset:
    """MNIST-1D (Greydanus & Kobak, 2020), generated offline by the ``mnist1d`` package.

    Uses ``mnist1d.data.make_dataset`` with the package's default arguments (40-dimensional
    signals, 10 classes, 4,000 / 1,000 train/test for the default 5,000 samples); nothing is
    downloaded. The package seeds numpy's global RNG; its state is restored afterwards.
    (``mnist1d`` is a required dependency, imported here because it is only needed here.)
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def f32(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def i64(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Dataset("mnist1d", f32(d["x"]), i64(d["y"]), f32(d["x_test"]), i64(d["y_test"]), 10,
                   info=dict(source="mnist1d.make_dataset (offline)", seed=seed,
                             num_samples=num_samples))


# ---------------------------------------------------------------------------------- synthetic
def teacher_student(
    n_train: int = 512,
    n_test: int = 256,
    in_features: int = 32,
    num_classes: int = 10,
    teacher_hidden: int = 64,
    seed: int = 0,
) -> Dataset:
    """A synthetic classification task: ``x ~ N(0, I_d)``, ``y = argmax_c T(x)_c`` with a random
    one-hidden-layer ReLU teacher ``T(x) = relu(x A) B``, ``A ~ N(0, 1/d)``, ``B ~ N(0, 1/h)``.

    Deterministic for a given ``seed``; cheap, for smoke tests and examples without any file.
    """
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x = torch.randn(n, in_features, generator=gen)
    a = torch.randn(in_features, teacher_hidden, generator=gen) / in_features**0.5
    b = torch.randn(teacher_hidden, num_classes, generator=gen) / teacher_hidden**0.5
    y = torch.relu(x @ a).matmul(b).argmax(1)
    return Dataset("teacher-student", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                   num_classes, info=dict(source="synthetic teacher-student", seed=seed,
                                          teacher_hidden=teacher_hidden))


def load_dataset(name: str, data_dir: str | Path | None = None, **kwargs) -> Dataset:
    """Load a dataset by name (:data:`DATASETS`).

    ``mnist``: IDX files with the MNIST normalisation; ``fashion-mnist``: IDX files standardised
    with the training set's statistics (``data_dir`` required); ``mnist1d``; ``teacher-student``.
    Extra keyword arguments go to the specific loader.
    """
    if name == "mnist":
        return load_idx_dataset(data_dir, normalization=kwargs.pop("normalization", "mnist"),
                                name="mnist", **kwargs)
    if name == "fashion-mnist":
        if data_dir is None:
            raise ValueError("fashion-mnist needs --data-dir pointing at its IDX files")
        return load_idx_dataset(data_dir, normalization=kwargs.pop("normalization",
                                                                    "standardize"),
                                name="fashion-mnist", **kwargs)
    if name == "mnist1d":
        return load_mnist1d(**kwargs)
    if name == "teacher-student":
        return teacher_student(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------- helpers
def full_batch_subset(ds: Dataset, size: int = 1024) -> Dataset:
    """The paper's full-batch setting: the **first** ``size`` training images, same test set."""
    if size > len(ds.y_train):
        raise ValueError(f"full-batch subset of {size} images requested but {ds.name} has only "
                         f"{len(ds.y_train)} training images")
    info = dict(ds.info, subset=f"first {size} training images")
    return Dataset(ds.name, ds.x_train[:size], ds.y_train[:size], ds.x_test, ds.y_test,
                   ds.num_classes, info)


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Y[i, c] = 1[y_i = c]``."""
    if y.dtype not in (torch.int64, torch.int32) or y.dim() != 1:
        raise ValueError("one_hot expects a 1-D integer tensor of class indices")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    return torch.nn.functional.one_hot(y.long(), num_classes).to(dtype)


def pad_to_multiple(ds: Dataset, multiple: int) -> Dataset:
    """Append zero features until ``d`` is a multiple of ``multiple`` (a RevMLP splits its input
    into two halves: ``multiple = 2``)."""
    extra = (-ds.in_features) % int(multiple)
    if extra == 0:
        return ds

    def pad(x):
        return torch.cat([x, x.new_zeros(x.shape[0], extra)], dim=1)

    return Dataset(ds.name, pad(ds.x_train), ds.y_train, pad(ds.x_test), ds.y_test,
                   ds.num_classes, dict(ds.info, padded=f"{extra} zero feature(s) appended"))


def pad_to_even(ds: Dataset) -> Dataset:
    """Append one zero feature when ``d`` is odd (:func:`pad_to_multiple` with 2)."""
    return pad_to_multiple(ds, 2)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffling order of epoch ``epoch``: a function of ``(seed, epoch)`` only, so a run
    resumed at an epoch boundary sees exactly the batches of an uninterrupted run."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int,
    shuffle: bool = True, drop_last: bool = False,
):
    """Yield ``(x_B, y_B)`` batches of one epoch (shuffled by :func:`epoch_permutation`)."""
    n = len(y)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    # the permutation is drawn on the CPU (the same on every device), then indexes on x's device
    order = (epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)).to(x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
