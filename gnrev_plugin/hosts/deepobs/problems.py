"""DeepOBS test problems: gnrev's registry models on local data, and DeepOBS's own MNIST problems
on a local IDX folder.

**gnrev's problems** (``mnist_revmlp``, ``fmnist_revmlp``, ``cifar10_revmlp``) follow DeepOBS's
PyTorch ``TestProblem`` interface (:class:`RegistryTestProblem`) and need no DeepOBS install. Their
network is built by :func:`gnrev_plugin.build.build_model` from a registry name (``gnrev.revmlp``
by default) with the entry's registered defaults (:mod:`gnrev_plugin.defaults`); a problem only
states what differs from them (``cifar10_revmlp``: ``num_blocks = 6``, the paper's CIFAR-10
depth). The model is seeded by ``torch.initial_seed()``, i.e. by the ``random_seed`` the runner
gave ``torch.manual_seed`` before ``set_up()``, so a problem's network for seed ``s`` is the one
``gnrev train --seed s`` builds. Data (nothing is downloaded): MNIST and Fashion-MNIST through the
registry datasets ``gnrev.mnist`` / ``gnrev.fashion_mnist`` (:func:`gnrev_plugin.build.load_data`),
CIFAR-10 from its python pickles (:func:`load_cifar10`). Directories: :func:`set_data_dir`, else
``$GNREV_DATA_DIR`` / ``../shared/data/mnist`` for MNIST, ``$GNREV_FMNIST_DIR`` and
``$GNREV_CIFAR10_DIR``.

**DeepOBS's own MNIST problems on local files** (need ``deepobs``): torchvision's ``MNIST`` reads
raw IDX files from ``<data_dir>/MNIST/raw/``. :func:`prepare_mnist_data_dir` writes them from
gnrev's MNIST folder. With only the ``t10k`` pair (10,000 images), it uses gnrev's own split
(:func:`gnrev_plugin.data.load_idx_dataset`): the *training* files hold the first 8,000 ``t10k``
images and the *test* files the last 2,000. DeepOBS's MNIST problems hold out
``train_eval_size = 10,000`` training images for validation, more than these 8,000, which would
leave no training batch; :func:`local_mnist_problem` therefore makes ``<name>_t10k``: DeepOBS's
class unchanged (network, initialisation, loss, data pipeline) except ``train_eval_size`` (2,000
by default: 6,000 training and 2,000 validation images). It is filed under its own name so its
results are never mistaken for the published full-MNIST baselines. With the full MNIST files
(``train`` + ``t10k`` pairs) the folder is written unchanged and DeepOBS's unmodified problems
(``mnist_logreg``, ``mnist_mlp``, ``mnist_2c2d``) run on it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from gnrev_plugin.build import build_model, load_data, resolve_device
from gnrev_plugin.data import (
    Dataset,
    default_data_dir,
    find_idx_files,
    load_idx_dataset,
    pad_to_multiple,
    read_idx,
)
from gnrev_plugin.registry import get_registry

from ...compat import deepobs as compat

__all__ = [
    "TEST_PROBLEMS", "TensorDataSet", "RegistryTestProblem", "mnist_revmlp", "fmnist_revmlp",
    "cifar10_revmlp", "make_test_problem", "set_data_dir", "load_cifar10",
    "register_with_deepobs", "write_idx", "prepare_mnist_data_dir", "local_mnist_problem",
    "LOCAL_MNIST_PROBLEMS", "register_local_mnist_problems", "CIFAR10_MEAN", "CIFAR10_STD",
]

_DATA_DIRS: dict[str, Path | None] = {"mnist": None, "fmnist": None, "cifar10": None}
_ENV = {"fmnist": "GNREV_FMNIST_DIR", "cifar10": "GNREV_CIFAR10_DIR"}
#: data-set key of a problem → the registry dataset that loads it (CIFAR-10 is read here).
_REGISTRY_DATASETS = {"mnist": "gnrev.mnist", "fmnist": "gnrev.fashion_mnist"}
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


def set_data_dir(dataset: str, path: str | Path | None) -> None:
    """Set the directory read by the ``<dataset>_revmlp`` problems (``mnist``, ``fmnist``,
    ``cifar10``); ``None`` restores the default."""
    if dataset not in _DATA_DIRS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(_DATA_DIRS)}")
    _DATA_DIRS[dataset] = None if path is None else Path(path)


def _data_dir(dataset: str) -> Path | None:
    if _DATA_DIRS[dataset] is not None:
        return _DATA_DIRS[dataset]
    env = _ENV.get(dataset)
    if env and os.environ.get(env):
        return Path(os.environ[env])
    if dataset == "mnist":
        return None  # gnrev_plugin.data.default_data_dir()
    raise FileNotFoundError(f"{dataset}_revmlp needs its data directory: call "
                            f"gnrev_plugin.hosts.deepobs.set_data_dir({dataset!r}, DIR) or set "
                            f"${env}. Nothing is downloaded.")


def load_cifar10(data_dir: str | Path, train_size: int | None = None,
                 test_size: int | None = None) -> Dataset:
    """CIFAR-10 from the python pickles (``data_batch_1`` … ``data_batch_5``, ``test_batch``).

    Images are flattened to ``d = 3072`` (channel-major, as stored) and normalised per channel,
    ``x_c ↦ (x_c/255 − mean_c)/std_c`` with the paper's CIFAR-10 statistics.
    """
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = data_dir / "cifar-10-batches-py"
    train_files = [data_dir / f"data_batch_{i}" for i in range(1, 6)]
    test_file = data_dir / "test_batch"
    missing = [p.name for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python pickles missing in {data_dir}: "
                                f"{', '.join(missing)} (the 'cifar-10-batches-py' folder of "
                                "cifar-10-python.tar.gz). Nothing is downloaded.")

    def read(paths):
        xs, ys = [], []
        for p in paths:
            with open(p, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = read(train_files)
    x_te, y_te = read([test_file])
    if train_size is not None:
        x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]
    if test_size is not None:
        x_te, y_te = x_te[:test_size], y_te[:test_size]
    mean = np.repeat(np.asarray(CIFAR10_MEAN, dtype=np.float32), 1024)
    std = np.repeat(np.asarray(CIFAR10_STD, dtype=np.float32), 1024)

    def norm(x):
        return torch.from_numpy(((x.astype(np.float32) / 255.0 - mean) / std).copy())

    return Dataset("cifar10", norm(x_tr), torch.from_numpy(y_tr.copy()), norm(x_te),
                   torch.from_numpy(y_te.copy()), 10, info=dict(source=str(data_dir)))


# ---------------------------------------------------------------------------------- data sets
class TensorDataSet:
    """A DeepOBS ``DataSet`` over in-memory tensors.

    Exposes DeepOBS's four loaders ``_train_dataloader`` (shuffled), ``_valid_dataloader``,
    ``_train_eval_dataloader`` and ``_test_dataloader``, all with ``batch_size`` and
    ``drop_last=True``. The last ``train_eval_size`` samples of a random permutation of the
    training split form the validation set and are removed from training (DeepOBS: 10,000 for
    MNIST/CIFAR); ``train_eval`` is a random subset of the remaining training samples of the
    same size. Randomness comes from the global torch RNG, which the runner seeds.
    """

    def __init__(self, batch_size: int, x_train: torch.Tensor, y_train: torch.Tensor,
                 x_test: torch.Tensor, y_test: torch.Tensor, train_eval_size: int | None = None):
        n = len(y_train)
        if train_eval_size is None:
            train_eval_size = 10_000 if n >= 60_000 else max(batch_size, n // 6)
        if not batch_size <= train_eval_size < n:
            raise ValueError(f"train_eval_size={train_eval_size} must lie in [batch_size="
                             f"{batch_size}, n_train={n})")
        if len(y_test) < batch_size:
            raise ValueError(f"the test split ({len(y_test)}) is smaller than one batch "
                             f"({batch_size}); DeepOBS drops incomplete batches")
        self._batch_size = batch_size
        self._train_eval_size = train_eval_size
        perm = torch.randperm(n, device="cpu")
        train_idx, valid_idx = perm[train_eval_size:], perm[:train_eval_size]
        train = TensorDataset(x_train[train_idx], y_train[train_idx])
        self._train_dataloader = DataLoader(train, batch_size=batch_size, shuffle=True,
                                            drop_last=True)
        self._valid_dataloader = DataLoader(
            TensorDataset(x_train[valid_idx], y_train[valid_idx]), batch_size=batch_size,
            drop_last=True)
        eval_idx = torch.randperm(len(train), device="cpu")[:train_eval_size]
        self._train_eval_dataloader = DataLoader(Subset(train, eval_idx.tolist()),
                                                 batch_size=batch_size, drop_last=True)
        self._test_dataloader = DataLoader(TensorDataset(x_test, y_test), batch_size=batch_size,
                                           drop_last=True)


# ---------------------------------------------------------------------------------- problems
class RegistryTestProblem:
    """A DeepOBS ``TestProblem``: a registry model (default ``gnrev.revmlp``) classifying a data set
    with cross-entropy.

    Interface (DeepOBS's): ``TestProblem(batch_size, weight_decay=None)``, ``set_up()`` creating
    ``data``, ``loss_function`` (a class called as ``loss_function(reduction=...)``), ``net`` and
    ``regularization_groups``; ``train_init_op()``, ``train_eval_init_op()``,
    ``valid_init_op()``, ``test_init_op()``; ``get_batch_loss_and_accuracy(reduction="mean",
    add_regularization_if_available=True)`` (next batch of the phase, ``StopIteration`` at the
    end) and ``get_batch_loss_and_accuracy_func(...)`` (a closure on one fixed batch);
    ``get_regularization_loss()``, ``get_regularization_groups()``.

    Class attributes: ``dataset`` (``"mnist"``, ``"fmnist"``, ``"cifar10"``); ``model`` (a
    registry name) and ``model_kwargs`` (only what differs from the entry's registered defaults);
    ``train_size`` / ``test_size`` / ``train_eval_size`` to shrink the data;
    ``default_batch_size`` / ``default_num_epochs`` (DeepOBS's defaults for MNIST problems).
    :func:`make_test_problem` makes variants. The paper's setting has no weight decay, so
    ``weight_decay`` is ignored with a warning, as DeepOBS's ``mnist_mlp`` does.
    """

    dataset = "mnist"
    model = "gnrev.revmlp"
    model_kwargs: dict = {}
    train_size: int | None = None
    test_size: int | None = None
    train_eval_size: int | None = None
    default_batch_size = 128
    default_num_epochs = 100

    def __init__(self, batch_size: int, weight_decay: float | None = None) -> None:
        self._batch_size = int(batch_size)
        self._weight_decay = weight_decay
        if weight_decay is not None:
            warnings.warn("Weight decay is non-zero but no weight decay is used for this model.",
                          RuntimeWarning)
        self._device = resolve_device(compat.default_device())  # DeepOBS's convention
        self.data = None
        self.loss_function = None
        self.net: nn.Module | None = None
        self.regularization_groups = None
        self._batch_count = 0
        self._iterator = None
        self.phase = None

    # -- set-up ---------------------------------------------------------------------------
    def load_data(self) -> Dataset:
        """The problem's data, padded to the model entry's ``input_multiple``."""
        multiple = get_registry().entry("model", get_registry().resolve_name(
            "model", self.model)).input_multiple
        if self.dataset == "cifar10":
            return pad_to_multiple(load_cifar10(_data_dir("cifar10"), self.train_size,
                                                self.test_size), multiple)
        kwargs = {"data_dir": _data_dir(self.dataset), "train_size": self.train_size,
                  "test_size": self.test_size}
        return load_data(_REGISTRY_DATASETS[self.dataset], kwargs, input_multiple=multiple)

    def set_up(self) -> None:
        """Load the data, build ``net`` with :func:`~gnrev_plugin.build.build_model` (seeded by
        ``torch.initial_seed()``) and the cross-entropy loss."""
        ds = self.load_data()
        self.data = TensorDataSet(self._batch_size, ds.x_train, ds.y_train, ds.x_test,
                                  ds.y_test, self.train_eval_size)
        self.loss_function = nn.CrossEntropyLoss
        self.net = build_model(self.model, self.model_kwargs, in_features=ds.in_features,
                               num_classes=ds.num_classes, seed=torch.initial_seed(),
                               device=self._device)
        self.regularization_groups = self.get_regularization_groups()

    # -- phases ---------------------------------------------------------------------------
    def train_init_op(self) -> None:
        self._iterator = iter(self.data._train_dataloader)
        self.phase = "train"
        self.net.train()

    def train_eval_init_op(self) -> None:
        self._iterator = iter(self.data._train_eval_dataloader)
        self.phase = "train_eval"
        self.net.eval()

    def valid_init_op(self) -> None:
        self._iterator = iter(self.data._valid_dataloader)
        self.phase = "valid"
        self.net.eval()

    def test_init_op(self) -> None:
        self._iterator = iter(self.data._test_dataloader)
        self.phase = "test"
        self.net.eval()

    def _get_next_batch(self):
        batch = next(self._iterator)
        self._batch_count += 1
        return batch

    # -- loss -----------------------------------------------------------------------------
    def get_batch_loss_and_accuracy_func(
        self, reduction: str = "mean", add_regularization_if_available: bool = True
    ) -> Callable[[], tuple[torch.Tensor, float]]:
        """Draw the phase's next batch and return ``forward() -> (loss, accuracy)`` on it."""
        inputs, labels = self._get_next_batch()
        inputs, labels = inputs.to(self._device), labels.to(self._device)

        def forward_func():
            if self.phase in ("train_eval", "test", "valid"):
                with torch.no_grad():
                    outputs = self.net(inputs)
                    loss = self.loss_function(reduction=reduction)(outputs, labels)
            else:
                outputs = self.net(inputs)
                loss = self.loss_function(reduction=reduction)(outputs, labels)
            accuracy = (outputs.detach().argmax(1) == labels).sum().item() / labels.size(0)
            if add_regularization_if_available:
                loss = loss + self.get_regularization_loss()
            return loss, accuracy

        return forward_func

    def get_batch_loss_and_accuracy(
        self, reduction: str = "mean", add_regularization_if_available: bool = True
    ) -> tuple[torch.Tensor, float]:
        """Loss and accuracy of ``net`` on the phase's next batch (``StopIteration`` at the end)."""
        return self.get_batch_loss_and_accuracy_func(reduction,
                                                     add_regularization_if_available)()

    def get_regularization_groups(self) -> dict[float, list[torch.Tensor]]:
        """``{factor: parameters}``; the paper's setting regularises nothing (factor 0)."""
        return {0.0: list(self.net.parameters())}

    def get_regularization_loss(self):
        """``½ Σ_groups factor · Σ ‖θ‖²`` over the groups (0 here, as an int like DeepOBS)."""
        norms = [factor * p.pow(2).sum() for factor, group in self.regularization_groups.items()
                 if factor > 0.0 for p in group]
        return 0.5 * sum(norms)


class mnist_revmlp(RegistryTestProblem):  # noqa: N801 - DeepOBS names problems in lower case
    """RevMLP on MNIST (registry defaults: linear first block, ``init_std = 1e-3``)."""

    dataset = "mnist"


class fmnist_revmlp(RegistryTestProblem):  # noqa: N801
    """RevMLP on Fashion-MNIST (IDX files; standardised with the training set's statistics)."""

    dataset = "fmnist"


class cifar10_revmlp(RegistryTestProblem):  # noqa: N801
    """RevMLP on flattened CIFAR-10 (``d = 3072``) with the paper's CIFAR-10 depth, 6 blocks."""

    dataset = "cifar10"
    model_kwargs = {"num_blocks": 6}


#: Test problem name → class.
TEST_PROBLEMS: dict[str, type[RegistryTestProblem]] = {
    "mnist_revmlp": mnist_revmlp, "fmnist_revmlp": fmnist_revmlp,
    "cifar10_revmlp": cifar10_revmlp,
}


def make_test_problem(name: str, model_kwargs: dict | None = None,
                      **attributes) -> type[RegistryTestProblem]:
    """A variant of test problem ``name``: ``model_kwargs`` update the problem's own (e.g.
    ``{"hidden": 64}``), ``attributes`` override class attributes (``train_size=1000``,
    ``model="toy.tiny_mlp"``, ...). It keeps the name, so results file under the same problem."""
    if name not in TEST_PROBLEMS:
        raise ValueError(f"unknown test problem {name!r}; known: {', '.join(TEST_PROBLEMS)}")
    base = TEST_PROBLEMS[name]
    unknown = [k for k in attributes if k == "model_kwargs" or not hasattr(base, k)]
    if unknown:
        raise ValueError(f"unknown test problem attributes {unknown} (model options go in "
                         "model_kwargs)")
    same_model = attributes.get("model", base.model) == base.model  # else base options drop
    attributes["model_kwargs"] = {**(base.model_kwargs if same_model else {}),
                                  **(model_kwargs or {})}
    return type(name, (base,), dict(attributes, __module__=__name__))


def register_with_deepobs(problems: dict[str, type] | None = None) -> None:
    """Make gnrev's problems known to an installed DeepOBS (its runners then accept
    ``testproblem="mnist_revmlp"``), with their default batch size and epochs and the display
    name ``"RevMLP"`` that ``deepobs.analyzer`` needs (:func:`compat.register_test_problem`)."""
    for name, cls in (problems or TEST_PROBLEMS).items():
        compat.register_test_problem(name, cls, batch_size=cls.default_batch_size,
                                     num_epochs=cls.default_num_epochs,
                                     display_name="RevMLP")


# ---------------------------------------------------------------------------------- local MNIST
def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (``uint8``) as an IDX file, gzipped if ``path`` ends in ``.gz``; the inverse
    of :func:`gnrev_plugin.data.read_idx` for ``uint8`` data."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big")
                                                         for s in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())
    return path


def prepare_mnist_data_dir(dest: str | Path, source: str | Path | None = None) -> Path:
    """Lay out ``dest/MNIST/raw/`` as torchvision's ``MNIST`` (hence DeepOBS) reads it, from gnrev's
    MNIST folder ``source`` (default :func:`gnrev_plugin.data.default_data_dir`); returns ``dest``,
    the ``data_dir`` to give DeepOBS.

    With ``train`` and ``t10k`` pairs in ``source`` both are written unchanged. With the ``t10k``
    pair alone, the split is gnrev's (:func:`~gnrev_plugin.data.load_idx_dataset`): training files
    = the first 8,000 ``t10k`` images, test files = the last 2,000. The files are uncompressed
    (torchvision checks for ``train-images-idx3-ubyte`` etc.), so DeepOBS never tries to download.
    """
    source = Path(source) if source is not None else default_data_dir()
    pairs = find_idx_files(source)
    raw = Path(dest) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    any_pair = pairs.get("t10k") or pairs["train"]
    image_shape = read_idx(any_pair[0]).shape[1:]
    ds = load_idx_dataset(source, normalization="none")  # gnrev's split; pixels / 255
    for prefix, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_test, ds.y_test)):
        pixels = (x * 255.0).round().to(torch.uint8).numpy().reshape(-1, *image_shape)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.numpy().astype(np.uint8))
    return Path(dest)


#: DeepOBS's MNIST problems that :func:`local_mnist_problem` adapts, with their display names.
LOCAL_MNIST_PROBLEMS = {"mnist_logreg": "Log. Reg.", "mnist_mlp": "MLP", "mnist_2c2d": "2c2d"}


def local_mnist_problem(name: str = "mnist_logreg", train_eval_size: int = 2000) -> type:
    """DeepOBS's test problem ``name`` (``mnist_logreg``, ``mnist_mlp`` or ``mnist_2c2d``) with
    ``train_eval_size`` validation images instead of 10,000, named ``<name>_t10k`` (module
    docstring). Everything else is DeepOBS's own ``set_up``. Needs ``deepobs``."""
    if name not in LOCAL_MNIST_PROBLEMS:
        raise ValueError(f"local MNIST problems: {', '.join(LOCAL_MNIST_PROBLEMS)}; got {name!r}")
    base = getattr(compat.import_deepobs().pytorch.testproblems, name)

    def set_up(self) -> None:
        with compat.mnist_train_eval_size(base, self.train_eval_size):
            base.set_up(self)

    doc = (f"DeepOBS's ``{name}`` on the local ``t10k`` split: ``train_eval_size = "
           f"{train_eval_size}`` (DeepOBS: 10,000); network, loss and data pipeline are "
           "DeepOBS's.")
    return type(f"{name}_t10k", (base,), {"set_up": set_up, "train_eval_size": train_eval_size,
                                          "__doc__": doc, "__module__": __name__})


def register_local_mnist_problems(train_eval_size: int = 2000) -> dict[str, type]:
    """Register ``mnist_logreg_t10k``, ``mnist_mlp_t10k`` and ``mnist_2c2d_t10k`` with DeepOBS
    (DeepOBS's default batch size and epochs of the originals) and return them by name."""
    dob = compat.import_deepobs()
    out = {}
    for name, display in LOCAL_MNIST_PROBLEMS.items():
        cls = local_mnist_problem(name, train_eval_size)
        settings = dob.config.get_testproblem_default_setting(name)
        compat.register_test_problem(cls.__name__, cls, batch_size=settings["batch_size"],
                                     num_epochs=settings["num_epochs"],
                                     display_name=f"{display} (t10k split)")
        out[cls.__name__] = cls
    return out
