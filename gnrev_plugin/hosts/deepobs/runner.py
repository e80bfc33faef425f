"""Running registered optimizers on DeepOBS: the ``optimizer_class`` bridge, DeepOBS's own runner,
and a DeepOBS-protocol runner for machines without DeepOBS.

* :func:`deepobs_optimizer_class` turns a registry name into what a DeepOBS runner takes: a class
  called as ``optimizer_class(params, **hyperparams)`` whose ``__name__`` is the registry name, so
  DeepOBS files and names results by it. Calling it builds the optimizer through
  :func:`gnrev_plugin.build.build_optimizer`: the entry's registered defaults are filled in, and
  an optimizer that declares ``needs=("model", "loss")`` (the Gauss-Newton optimizers, the
  sharpness wrappers) gets the network and the loss name. DeepOBS hands over only
  ``tproblem.net.parameters()``; the network owning them is found with the package's one
  discovery mechanism
  (:func:`gnrev_plugin.nn.discovery.find_module_owning`, a scan of the live ``nn.Module``
  objects for the smallest, then outermost, one owning these parameters).
* :func:`hyperparameter_names` declares every registered default of the optimizer (typed, with
  its default) plus the options passed, so DeepOBS records them all in
  ``optimizer_hyperparams`` and in the folder name, e.g. the runners' GN rank policy
  ``rank_policy="warn"`` (:mod:`gnrev_plugin.defaults`): a rank-deficient batch then takes the
  least-squares step with a warning instead of ending the run.
* :func:`run_deepobs` runs DeepOBS 1.1.2's own ``deepobs.pytorch.runners.StandardRunner``
  (imported through :mod:`gnrev_plugin.compat.deepobs`) with both.
* :class:`StandardRunner` is DeepOBS's ``StandardRunner`` protocol without DeepOBS: the same loop,
  evaluation and result files (:mod:`.results`); the test suite checks that both write the same
  JSON.

Loss: DeepOBS's classification problems use cross-entropy (the default ``loss``). A GN optimizer
recognises the loss applied to the network's output in the unmodified loop
``zero_grad → loss.backward() → step`` only if it is ``nn.CrossEntropyLoss`` / ``nn.MSELoss``;
on a problem whose network *outputs* the loss (``quadratic_deep``) its step raises
:class:`~gnrev_plugin.optim.errors.LossCaptureError` saying so.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gnrev_plugin.build import LOSSES, build_optimizer
from gnrev_plugin.nn.discovery import find_module_owning
from gnrev_plugin.registry import Registry, get_registry

from ...compat import deepobs as compat
from .problems import TEST_PROBLEMS, set_data_dir
from .results import result_path, write_result

__all__ = ["deepobs_optimizer_class", "hyperparameter_names", "run_deepobs", "StandardRunner"]


def _owning_model(params: Iterable) -> nn.Module:
    params = list(params)
    if any(isinstance(p, dict) for p in params):
        raise ValueError("a DeepOBS optimizer_class receives tproblem.net.parameters(); parameter "
                         "groups are not supported")
    try:
        model = find_module_owning(params)
    except ValueError as err:
        raise ValueError(f"DeepOBS hands the optimizer only the network's parameters and gnrev "
                         f"could not find the network owning them: {err}") from err
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != {id(p) for p in params}:
        raise ValueError(f"the optimizer was given {len(params)} parameter tensors, but the "
                         f"network owning them ({type(model).__name__}) trains {len(trainable)}; "
                         "DeepOBS passes all of tproblem.net.parameters()")
    return model


def deepobs_optimizer_class(name: str, *, loss: str = "cross_entropy",
                            registry: Registry | None = None) -> type:
    """A DeepOBS ``optimizer_class`` for registered optimizer ``name`` (module docstring).

    ``cls(params, **hyperparams)`` returns the registered optimizer's own object, built by
    :func:`~gnrev_plugin.build.build_optimizer` with ``hyperparams`` over the entry's defaults;
    ``cls.__name__`` is the registry name (``"exact_gn"`` becomes ``"gnrev.exact_gn"``).
    ``loss`` (``"cross_entropy"`` or ``"mse"``) is passed to optimizers that need it.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    reg = registry if registry is not None else get_registry()
    name = reg.resolve_name("optimizer", name)
    entry = reg.entry("optimizer", name)

    def __new__(cls, params, **hyperparams):  # noqa: N807 - a factory class
        return build_optimizer(name, _owning_model(params), hyperparams, loss=loss,
                               registry=reg)

    doc = (f"DeepOBS optimizer_class for the registered optimizer {name!r} "
           f"({entry.description or entry.target}); instances are built by "
           "gnrev_plugin.build.build_optimizer.")
    return type(name, (), {"__new__": __new__, "__doc__": doc, "__module__": __name__,
                           "__qualname__": name, "registry_name": name, "loss": loss,
                           "needs": entry.needs})


def _as_is(value: Any) -> Any:
    return value


def _hp_type(value: Any):
    return type(value) if isinstance(value, bool | int | float | str) else _as_is


def hyperparameter_names(name: str, hyperparams: dict | None = None,
                         registry: Registry | None = None) -> dict[str, dict]:
    """DeepOBS's ``hyperparameter_names`` for optimizer ``name``: ``{option: {"type": T,
    "default": v}}`` for every registered default, plus ``{"type": T}`` for each further option
    in ``hyperparams``. ``T`` is the default's type (else the value's), ``bool``/``int``/``float``/
    ``str``, or a pass-through for JSON lists."""
    reg = registry if registry is not None else get_registry()
    defaults = reg.entry("optimizer", reg.resolve_name("optimizer", name)).defaults
    out = {}
    for key, value in {**defaults, **dict(hyperparams or {})}.items():
        spec = {"type": _hp_type(defaults.get(key, value))}
        if key in defaults:
            spec["default"] = defaults[key]
        out[key] = spec
    return out


def run_deepobs(optimizer: str, testproblem: str, hyperparams: dict | None = None, *,
                loss: str = "cross_entropy", batch_size: int | None = None,
                num_epochs: int | None = None, random_seed: int = 42,
                output_dir: str | Path = "./results", data_dir: str | Path | None = None,
                weight_decay: float | None = None, train_log_interval: int = 10,
                print_train_iter: bool = False, registry: Registry | None = None) -> dict:
    """Train registered ``optimizer`` on ``testproblem`` with DeepOBS's own ``StandardRunner`` and
    return its output dict (also written under ``output_dir``, named by the registry name).

    ``testproblem`` is a DeepOBS problem (``quadratic_deep``, ...) or one registered with it
    (:func:`~.problems.register_with_deepobs`, :func:`~.problems.register_local_mnist_problems`).
    ``data_dir`` is DeepOBS's data folder (e.g. from :func:`~.problems.prepare_mnist_data_dir`).
    ``None`` for ``batch_size`` / ``num_epochs`` takes DeepOBS's default for the problem.
    """
    dob = compat.import_deepobs()
    if not hasattr(dob.pytorch.testproblems, testproblem):
        raise ValueError(f"DeepOBS has no PyTorch test problem {testproblem!r}; register gnrev's "
                         "with register_with_deepobs() and the local MNIST ones with "
                         "register_local_mnist_problems()")
    cls = deepobs_optimizer_class(optimizer, loss=loss, registry=registry)
    names = hyperparameter_names(cls.registry_name, hyperparams, registry)
    runner = dob.pytorch.runners.StandardRunner(cls, names)
    compat.fresh_quadratic_deep()  # the same quadratic in every run of the process
    with compat.plain_argv():
        return runner.run(testproblem=testproblem, hyperparams=dict(hyperparams or {}),
                          batch_size=batch_size, num_epochs=num_epochs, random_seed=random_seed,
                          data_dir=None if data_dir is None else str(data_dir),
                          output_dir=str(output_dir), weight_decay=weight_decay, no_logs=False,
                          train_log_interval=train_log_interval,
                          print_train_iter=print_train_iter, tb_log=False, tb_log_dir="none")


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
        """Seed ``random``, numpy and torch, then build and set up the problem."""
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
        """DeepOBS's training loop; returns the per-epoch and mini-batch logs."""
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
        logging (``tb_log``) is not supported. ``data_dir`` sets the data folder of a gnrev
        problem (:func:`~.problems.set_data_dir`).
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
        meta = {"testproblem": name, "batch_size": batch_size, "num_epochs": num_epochs,
                "random_seed": random_seed, "weight_decay": weight_decay,
                "optimizer_name": self._optimizer_name, "optimizer_hyperparams": hyperparams,
                "training_params": {}}
        folder = result_path(output_dir, meta).parent
        if skip_if_exists and folder.is_dir() and any(
                folder.glob(f"random_seed__{random_seed}__*.json")):
            print(f"found output for this run in {folder}; skipping it", file=sys.stderr)
            return None
        tproblem = self.create_testproblem(cls, batch_size, weight_decay, random_seed)
        logs = self.training(tproblem, dict(hyperparams), num_epochs, print_train_iter,
                             train_log_interval)
        # DeepOBS's rule, verbatim: ``all(test_accuracies) == 0``, i.e. any accuracy of exactly 0
        # (a problem without accuracies reports 0 everywhere) drops the three accuracy lists.
        if not all(logs["test_accuracies"]):
            for key in ("train_accuracies", "valid_accuracies", "test_accuracies"):
                del logs[key]
        output = {**meta, **logs}
        if not no_logs:
            print(f"wrote {write_result(output_dir, output)}", file=sys.stderr)
        return output
