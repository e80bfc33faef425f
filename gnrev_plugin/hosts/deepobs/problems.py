"""DeepOBS adapter: RevMLP test problems, a StandardRunner-style loop and DeepOBS's result layout.

DeepOBS (Schneider, Balles & Hennig, ICLR 2019) benchmarks optimizers on *test problems* through a
*runner* that writes one JSON file per run. Its PyTorch API does not install cleanly on current
stacks (the PyPI wheel imports TensorFlow at package import), so this module does not import
``deepobs``; it implements the documented interfaces so that

* the test problems ``mnist_revmlp``, ``fmnist_revmlp`` and ``cifar10_revmlp`` (the reversible MLP
  of Buffelli et al. 2024 on flattened images, cross-entropy on ``F = X^(L) U``) work with DeepOBS's
  own runners (:func:`register_with_deepobs`) and with :class:`StandardRunner` here;
* :class:`ExactGN` is a drop-in ``optimizer_class``: the standard loop
  ``opt.zero_grad(); loss, acc = tproblem.get_batch_loss_and_accuracy(); loss.backward();
  opt.step()`` takes exact Gauss-Newton steps ``J Δθ = −α ε`` on each mini-batch;
* results land in DeepOBS's folder and JSON layout::

      <output_dir>/<testproblem>/<optimizer class name>/
          num_epochs__<E>__batch_size__<B>[__weight_decay__<wd>]__<hp>__<value>.../
              random_seed__<seed>__<YYYY-mm-dd-HH-MM-SS>.json

  with keys ``testproblem, batch_size, num_epochs, random_seed, weight_decay, optimizer_name,
  optimizer_hyperparams, training_params, train_losses, valid_losses, test_losses,
  minibatch_train_losses, train_accuracies, valid_accuracies, test_accuracies``; the per-epoch
  lists hold ``num_epochs + 1`` values (evaluation before each epoch and after the last), so
  ``deepobs.analyzer`` and the published DeepOBS baselines read them alongside.

Evaluation follows DeepOBS: each phase's loss and accuracy is the mean over its mini-batches of
size ``batch_size`` (``drop_last=True``); the validation set is held out of the training split and
``train_eval`` is a random subset of the training split of the same size.

Data (nothing is downloaded): MNIST and Fashion-MNIST from MNIST-format IDX files
(:func:`gnrev_plugin.data.load_idx_dataset`), CIFAR-10 from its python pickles
(``data_batch_1..5``, ``test_batch``). Directories: :func:`set_data_dir`, else
``$GNREV_DATA_DIR`` / ``../shared/data/mnist`` for MNIST, ``$GNREV_FMNIST_DIR`` and
``$GNREV_CIFAR10_DIR``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from gnrev_plugin.data import Dataset, load_idx_dataset
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN as _ExactGN

__all__ = [
    "TEST_PROBLEMS", "ExactGN", "TensorDataSet", "RevMLPTestProblem", "mnist_revmlp",
    "fmnist_revmlp", "cifar10_revmlp", "make_test_problem", "set_data_dir", "load_cifar10",
    "StandardRunner", "float2str", "run_folder_name", "register_with_deepobs", "RESULT_KEYS",
]

#: Keys of a DeepOBS result JSON for a classification problem, in DeepOBS's order.
RESULT_KEYS = (
    "testproblem", "batch_size", "num_epochs", "random_seed", "weight_decay", "optimizer_name",
    "optimizer_hyperparams", "training_params", "train_losses", "valid_losses", "test_losses",
    "minibatch_train_losses", "train_accuracies", "valid_accuracies", "test_accuracies",
)

_DATA_DIRS: dict[str, Path | None] = {"mnist": None, "fmnist": None, "cifar10": None}
_ENV = {"fmnist": "GNREV_FMNIST_DIR", "cifar10": "GNREV_CIFAR10_DIR"}
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


class ExactGN(_ExactGN):
    """:class:`gnrev_plugin.optim.ExactGN` with ``loss="cross_entropy"`` by default, the loss of
    every DeepOBS classification problem, so ``ExactGN(params, lr=α)`` is a complete
    ``optimizer_class`` and DeepOBS records ``optimizer_name = "ExactGN"``."""

    def __init__(self, params, lr: float = 1.0, loss: str = "cross_entropy", **kwargs) -> None:
        super().__init__(params, lr=lr, loss=loss, **kwargs)


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
        perm = torch.randperm(n)
        train_idx, valid_idx = perm[train_eval_size:], perm[:train_eval_size]
        train = TensorDataset(x_train[train_idx], y_train[train_idx])
        self._train_dataloader = DataLoader(train, batch_size=batch_size, shuffle=True,
                                            drop_last=True)
        self._valid_dataloader = DataLoader(
            TensorDataset(x_train[valid_idx], y_train[valid_idx]), batch_size=batch_size,
            drop_last=True)
        eval_idx = torch.randperm(len(train))[:train_eval_size]
        self._train_eval_dataloader = DataLoader(Subset(train, eval_idx.tolist()),
                                                 batch_size=batch_size, drop_last=True)
        self._test_dataloader = DataLoader(TensorDataset(x_test, y_test), batch_size=batch_size,
                                           drop_last=True)


# ---------------------------------------------------------------------------------- problems
class RevMLPTestProblem:
    """A DeepOBS ``TestProblem``: a :class:`~gnrev_plugin.nn.RevMLP` classifier on a data set.

    Interface (DeepOBS's): ``TestProblem(batch_size, weight_decay=None)``, ``set_up()`` creating
    ``data``, ``loss_function`` (a class called as ``loss_function(reduction=...)``), ``net`` and
    ``regularization_groups``; ``train_init_op()``, ``train_eval_init_op()``,
    ``valid_init_op()``, ``test_init_op()``; ``get_batch_loss_and_accuracy(reduction="mean",
    add_regularization_if_available=True)`` (next batch of the phase, ``StopIteration`` at the
    end) and ``get_batch_loss_and_accuracy_func(...)`` (a closure on one fixed batch);
    ``get_regularization_loss()``, ``get_regularization_groups()``.

    The paper's setting has no weight decay, so ``weight_decay`` is ignored with a warning (as
    DeepOBS's ``mnist_mlp`` does). Class attributes set the architecture (paper: ``hidden =
    8000``, 2 blocks for MNIST, 6 for CIFAR-10, linear first block, ``init_std = 1e-3``) and
    ``train_size`` / ``test_size`` can shrink the data; :func:`make_test_problem` makes such
    variants.
    """

    dataset = "mnist"
    in_features = 784
    num_classes = 10
    hidden = 8000
    num_blocks = 2
    linear_first_block = True
    init_std = 1e-3
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
        self._device = torch.device("cpu")
        self.data = None
        self.loss_function = None
        self.net: nn.Module | None = None
        self.regularization_groups = None
        self._batch_count = 0
        self._iterator = None
        self.phase = None

    # -- set-up ---------------------------------------------------------------------------
    def load_data(self) -> Dataset:
        if self.dataset == "cifar10":
            return load_cifar10(_data_dir("cifar10"), self.train_size, self.test_size)
        normalization = "mnist" if self.dataset == "mnist" else "standardize"
        return load_idx_dataset(_data_dir(self.dataset), normalization=normalization,
                                train_size=self.train_size, test_size=self.test_size,
                                name=self.dataset)

    def set_up(self) -> None:
        ds = self.load_data()
        if ds.in_features != self.in_features:
            raise ValueError(f"{type(self).__name__} expects d={self.in_features} inputs, the "
                             f"data has d={ds.in_features}")
        self.data = TensorDataSet(self._batch_size, ds.x_train, ds.y_train, ds.x_test,
                                  ds.y_test, self.train_eval_size)
        self.loss_function = nn.CrossEntropyLoss
        self.net = RevMLP(in_features=self.in_features, hidden=self.hidden,
                          num_blocks=self.num_blocks, num_classes=self.num_classes,
                          linear_first_block=self.linear_first_block,
                          init_std=self.init_std).to(self._device)
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


class mnist_revmlp(RevMLPTestProblem):  # noqa: N801 - DeepOBS names problems in lower case
    """RevMLP on MNIST (paper preset: d = 784, M = 8000, L = 2, linear first block)."""

    dataset, in_features, num_blocks = "mnist", 784, 2


class fmnist_revmlp(RevMLPTestProblem):  # noqa: N801
    """RevMLP on Fashion-MNIST (IDX files; standardised with the training set's statistics)."""

    dataset, in_features, num_blocks = "fmnist", 784, 2


class cifar10_revmlp(RevMLPTestProblem):  # noqa: N801
    """RevMLP on flattened CIFAR-10 (paper preset: d = 3072, M = 8000, L = 6)."""

    dataset, in_features, num_blocks = "cifar10", 3072, 6


#: Test problem name → class.
TEST_PROBLEMS: dict[str, type[RevMLPTestProblem]] = {
    "mnist_revmlp": mnist_revmlp, "fmnist_revmlp": fmnist_revmlp,
    "cifar10_revmlp": cifar10_revmlp,
}


def make_test_problem(name: str, **attributes) -> type[RevMLPTestProblem]:
    """A variant of test problem ``name`` with class attributes overridden (e.g. ``hidden=64,
    train_size=1000``); it keeps the name, so results file under the same test problem."""
    if name not in TEST_PROBLEMS:
        raise ValueError(f"unknown test problem {name!r}; known: {', '.join(TEST_PROBLEMS)}")
    base = TEST_PROBLEMS[name]
    unknown = [k for k in attributes if not hasattr(base, k)]
    if unknown:
        raise ValueError(f"unknown test problem attributes {unknown}")
    return type(name, (base,), dict(attributes, __module__=__name__))


def register_with_deepobs(problems: dict[str, type] | None = None) -> None:
    """Make the problems known to an installed DeepOBS: add them to
    ``deepobs.pytorch.testproblems`` (so its runners accept ``testproblem="mnist_revmlp"``), their
    default batch size / epochs to ``deepobs.config``, and the display name ``"RevMLP"`` to its
    naming table (which ``deepobs.analyzer`` needs). Needs ``deepobs`` importable."""
    from deepobs import config  # noqa: PLC0415 - optional host
    from deepobs.pytorch import testproblems  # noqa: PLC0415

    for name, cls in (problems or TEST_PROBLEMS).items():
        setattr(testproblems, name, cls)
        config.DEFAULT_TEST_PROBLEMS_SETTINGS[name] = {
            "batch_size": cls.default_batch_size, "num_epochs": cls.default_num_epochs}
    config.TP_NAMING["revmlp"] = "RevMLP"


# ---------------------------------------------------------------------------------- runner
def float2str(x: float) -> str:
    """DeepOBS's float format in folder names: 10-digit scientific, trailing zeros of the
    mantissa stripped (``0.01 → "1.e-02"``, ``0.125 → "1.25e-01"``)."""
    mantissa, exponent = f"{x:.10e}".split("e")
    return mantissa.rstrip("0") + "e" + exponent


def _fmt(v) -> str:
    return float2str(v) if isinstance(v, float) else str(v)


def run_folder_name(num_epochs: int, batch_size: int, weight_decay: float | None,
                    hyperparams: dict, training_params: dict | None = None) -> str:
    """``num_epochs__E__batch_size__B[__weight_decay__wd]`` then ``__name__value`` for each
    hyperparameter and each non-``None`` training parameter, both sorted by name."""
    name = f"num_epochs__{num_epochs}__batch_size__{batch_size}"
    if weight_decay is not None:
        name += f"__weight_decay__{float2str(weight_decay)}"
    for k, v in sorted(hyperparams.items()):
        name += f"__{k}__{_fmt(v)}"
    for k, v in sorted((training_params or {}).items()):
        if v is not None:
            name += f"__{k}__{_fmt(v)}"
    return name


class StandardRunner:
    """DeepOBS's ``StandardRunner`` protocol without DeepOBS.

    ``StandardRunner(optimizer_class, hyperparameter_names)`` with ``hyperparameter_names =
    {name: {"type": T, "default": v (optional)}}``; :meth:`run` seeds ``random``, numpy and
    torch with ``random_seed``, builds the test problem, trains for ``num_epochs`` with
    ``opt = optimizer_class(tproblem.net.parameters(), **hyperparams)`` in the unmodified loop
    ``zero_grad → get_batch_loss_and_accuracy → backward → step``, evaluates train_eval / valid /
    test before every epoch and after the last, logs every ``train_log_interval``-th mini-batch
    loss, and writes the JSON (unless ``no_logs``). Arguments are explicit (no ``sys.argv``).
    """

    def __init__(self, optimizer_class: type, hyperparameter_names: dict[str, dict]) -> None:
        self._optimizer_class = optimizer_class
        self._optimizer_name = optimizer_class.__name__
        self._hyperparameter_names = hyperparameter_names

    def _resolve_hyperparams(self, hyperparams: dict | None) -> dict:
        hyperparams = dict(hyperparams or {})
        unknown = set(hyperparams) - set(self._hyperparameter_names)
        if unknown:
            raise ValueError(f"hyperparameters {sorted(unknown)} are not declared in "
                             "hyperparameter_names")
        for name, spec in self._hyperparameter_names.items():
            if name in hyperparams:
                hyperparams[name] = spec["type"](hyperparams[name])
            elif "default" in spec:
                hyperparams[name] = spec["default"]
            else:
                raise ValueError(f"hyperparameter {name!r} of {self._optimizer_name} has no "
                                 "default; pass it in hyperparams")
        return hyperparams

    @staticmethod
    def create_testproblem(testproblem: str | type, batch_size: int,
                           weight_decay: float | None, random_seed: int):
        random.seed(random_seed)
        np.random.seed(random_seed)
        torch.manual_seed(random_seed)
        cls = TEST_PROBLEMS[testproblem] if isinstance(testproblem, str) else testproblem
        tproblem = cls(batch_size) if weight_decay is None else cls(batch_size, weight_decay)
        tproblem.set_up()
        return tproblem

    @staticmethod
    def evaluate(tproblem, phase: str) -> tuple[float, float]:
        """Mean loss and accuracy over the phase's batches (``TRAIN``/``VALID``/``TEST``)."""
        {"TRAIN": tproblem.train_eval_init_op, "VALID": tproblem.valid_init_op,
         "TEST": tproblem.test_init_op}[phase]()
        loss, accuracy, count = 0.0, 0.0, 0
        while True:
            try:
                batch_loss, batch_accuracy = tproblem.get_batch_loss_and_accuracy()
            except StopIteration:
                break
            loss += batch_loss.item()
            accuracy += batch_accuracy
            count += 1
        return loss / count, accuracy / count

    def training(self, tproblem, hyperparams: dict, num_epochs: int, print_train_iter: bool,
                 train_log_interval: int) -> dict:
        opt = self._optimizer_class(tproblem.net.parameters(), **hyperparams)
        logs = {k: [] for k in ("train_losses", "valid_losses", "test_losses",
                                "minibatch_train_losses", "train_accuracies",
                                "valid_accuracies", "test_accuracies")}
        for epoch in range(num_epochs + 1):
            for phase, key in (("TRAIN", "train"), ("VALID", "valid"), ("TEST", "test")):
                loss, acc = self.evaluate(tproblem, phase)
                logs[f"{key}_losses"].append(loss)
                logs[f"{key}_accuracies"].append(acc)
            if epoch == num_epochs:
                break
            tproblem.train_init_op()
            batch_count, finite = 0, True
            while True:
                try:
                    opt.zero_grad()
                    batch_loss, _ = tproblem.get_batch_loss_and_accuracy()
                    batch_loss.backward()
                    opt.step()
                except StopIteration:
                    break
                except FloatingPointError as err:  # gnrev's NonFiniteError: nothing was changed
                    warnings.warn(f"non-finite step in epoch {epoch}: {err}", RuntimeWarning)
                    finite = False
                    break
                if batch_count % train_log_interval == 0:
                    logs["minibatch_train_losses"].append(batch_loss.item())
                    if print_train_iter:
                        print(f"Epoch {epoch}, step {batch_count}: loss {batch_loss.item():g}")
                batch_count += 1
            if not finite or not np.isfinite(batch_loss.item()):
                self._abort(epoch, num_epochs, logs)
                break
        return logs

    @staticmethod
    def _abort(epoch: int, num_epochs: int, logs: dict) -> None:
        """DeepOBS's abort routine: pad the remaining epochs with the initial values."""
        warnings.warn(f"Breaking from run after epoch {epoch} (loss is NaN or Inf); the "
                      "remaining epochs are filled with the initial values.", RuntimeWarning)
        for _ in range(epoch, num_epochs):
            for values in logs.values():
                if values:
                    values.append(values[0])

    def run(self, testproblem: str | type, hyperparams: dict | None = None,
            batch_size: int | None = None, num_epochs: int | None = None,
            random_seed: int = 42, data_dir: str | Path | None = None,
            output_dir: str | Path = "./results", weight_decay: float | None = None,
            no_logs: bool = False, train_log_interval: int = 10,
            print_train_iter: bool = False, tb_log: bool = False, tb_log_dir: str = "none",
            skip_if_exists: bool = False, **training_params) -> dict | None:
        """Train and return DeepOBS's output dict; write it as JSON under ``output_dir``.

        With ``skip_if_exists`` a run whose ``random_seed__<seed>__*.json`` already exists in its
        settings folder is not repeated (``None`` is returned), as in DeepOBS. TensorBoard
        logging (``tb_log``) is not supported.
        """
        if tb_log:
            raise ValueError("tb_log is not supported by gnrev's StandardRunner")
        del tb_log_dir
        if training_params:
            raise ValueError(f"StandardRunner takes no training parameters, got "
                             f"{sorted(training_params)}")
        cls = TEST_PROBLEMS[testproblem] if isinstance(testproblem, str) else testproblem
        name = cls.__name__
        hyperparams = self._resolve_hyperparams(hyperparams)
        batch_size = int(batch_size or cls.default_batch_size)
        num_epochs = int(num_epochs if num_epochs is not None else cls.default_num_epochs)
        if data_dir is not None:
            set_data_dir(cls.dataset, data_dir)
        folder = Path(output_dir) / name / self._optimizer_name / run_folder_name(
            num_epochs, batch_size, weight_decay, hyperparams)
        if skip_if_exists and folder.is_dir() and any(folder.glob(f"random_seed__{random_seed}__*.json")):
            print(f"found output for this run in {folder}; skipping it", file=sys.stderr)
            return None
        file_name = f"random_seed__{random_seed}__{time.strftime('%Y-%m-%d-%H-%M-%S')}.json"
        tproblem = self.create_testproblem(cls, batch_size, weight_decay, random_seed)
        logs = self.training(tproblem, dict(hyperparams), num_epochs, print_train_iter,
                             train_log_interval)
        if all(a == 0 for a in logs["test_accuracies"]):  # a problem without accuracies
            for key in ("train_accuracies", "valid_accuracies", "test_accuracies"):
                del logs[key]
        output = {"testproblem": name, "batch_size": batch_size, "num_epochs": num_epochs,
                  "random_seed": random_seed, "weight_decay": weight_decay,
                  "optimizer_name": self._optimizer_name, "optimizer_hyperparams": hyperparams,
                  "training_params": {}, **logs}
        if not no_logs:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / file_name, "w") as fh:
                json.dump(output, fh, indent=4)
            output_path = folder / file_name
            print(f"wrote {output_path}", file=sys.stderr)
        return output
