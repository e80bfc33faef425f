"""benchopt solvers for every registered optimizer, built through gnrev's registry.

:func:`make_solver(name) <make_solver>` returns a benchopt solver class whose ``name`` is the
registry name (``gnrev.exact_gn``, ``gnrev.adam``, a plugin's ``toy.sign_sgd``, ...), so
``benchopt run BENCH -s NAME`` selects it and results are named by it. Its benchopt
``parameters`` are ``batch_size``, ``device`` and the registry entry's defaults (``lr``, and for
the GN family the runners' ``rank_policy``), so ``-s "gnrev.exact_gn[lr=0.5]"`` works.

**Device.** ``device`` (default :data:`gnrev_plugin.defaults.RUN_DEFAULTS` ``["device"]``, i.e.
``"cpu"``) is the torch device the solver trains on: ``-s "gnrev.exact_gn[device=cuda]"`` moves
the model from ``model_init_fn`` and the training data there (the default model is built there
by :func:`gnrev_plugin.build.build_model`). It is checked by
:func:`gnrev_plugin.build.resolve_device`: ``device=cuda`` on a machine without a GPU makes the
solver skip, saying so (and ``set_objective`` raises that ``ValueError``). The epoch order is
drawn on the CPU from the run's seed, so every device sees the same batches. The result's model
lives on ``device``; the shipped objective evaluates it there.

Every solver trains ``model = model_init_fn()`` by mini-batch epochs and is sampled once per
epoch (``sampling_strategy = "callback"``, ``get_next(k) = k + 1``, the pattern of benchopt's
``benchmark_resnet_classif``): ``run(cb)`` is ``while cb(): one_epoch()``. A step is
:func:`gnrev_plugin.stepping.train_step` (the GN family's ``step_on_batch`` when present, else
``zero_grad(); backward(); step()``).

The objective hands the solvers (``Objective.get_objective()``)::

    X, y                  training inputs (n, d) and class indices (n,)  (tensors or numpy arrays)
    model_init_fn         optional zero-argument callable → nn.Module (default: the registry's
                          default model on X's width and y's classes)
    loss                  optional "cross_entropy" (integer y) or "mse" (one-hot y, (n, C))
    framework             optional; solvers skip anything but "pytorch"
    track_batch_loss_change   optional; the result then also carries the epoch's mean
                          per-batch loss change and, for GN solvers, the fraction of exact steps

and the result is ``dict(model=model)`` (plus ``batch_loss_change``, ``exact_step_fraction``
when tracking). In a benchmark whose objective gives something else (float labels of a binary
linear model, a framework other than PyTorch, a model the optimizer cannot handle), the solver
skips with a message that says what it needs: ``skip`` checks the inputs and runs one dry step
on a fresh model from ``model_init_fn``.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import torch
from benchopt import BaseSolver
from benchopt.stopping_criterion import SufficientProgressCriterion

from gnrev_plugin.build import build_loss, build_model, build_optimizer, loss_targets, resolve_device
from gnrev_plugin.defaults import RUN_DEFAULTS
from gnrev_plugin.hosts.benchopt.problem import as_tensor
from gnrev_plugin.registry import get_registry
from gnrev_plugin.stepping import train_step

__all__ = ["RegistrySolver", "make_solver"]

#: Mini-batch size of every solver unless ``-s "NAME[batch_size=...]"``.
BATCH_SIZE = 128
#: The solver parameters that belong to the runner, not to the optimizer.
RUNNER_PARAMETERS = ("batch_size", "device")


class RegistrySolver(BaseSolver):
    """Epoch-wise mini-batch training of ``model_init_fn()`` with one registry optimizer.

    Subclasses (from :func:`make_solver`) set ``name`` (the registry name) and ``parameters``.
    The epoch order is shuffled with a generator seeded by benchopt's run seed, so every solver
    sees the same batches.
    """

    name = "gnrev-registry-solver"
    requirements = ["pip::torch"]
    sampling_strategy = "callback"
    stopping_criterion = SufficientProgressCriterion(
        eps=1e-8, patience=5, strategy="callback", key_to_monitor="objective_value"
    )
    parameters = {"batch_size": [BATCH_SIZE], "device": [RUN_DEFAULTS["device"]]}

    # ------------------------------------------------------------------ data checks
    @staticmethod
    def _problem(X, y, loss: str | None, model_init_fn, device: torch.device | None = None):
        """``(X, y, targets, loss, model_init_fn)`` on ``device`` (default: where ``X`` is) or a
        string saying what is missing."""
        X = as_tensor(X, dtype=torch.get_default_dtype())
        y = as_tensor(y)
        if X.dim() > 2:
            X = X.flatten(1)
        if X.dim() != 2 or len(X) != len(y) or len(y) == 0:
            return (f"needs training inputs X of shape (n, d) and n labels y; got X "
                    f"{tuple(X.shape)} and y {tuple(y.shape)}")
        if loss is None:
            if y.is_floating_point():
                return (f"trains classifiers on integer class labels y (cross-entropy) or on "
                        f"one-hot targets with loss='mse'; this objective gives float labels y "
                        f"of shape {tuple(y.shape)} and no loss")
            loss = "cross_entropy"
        if loss == "cross_entropy":
            if y.is_floating_point() or y.dim() != 1 or int(y.min()) < 0:
                return (f"cross-entropy needs class indices 0..C-1 in a 1-D integer y; got "
                        f"{y.dtype} of shape {tuple(y.shape)}")
            num_classes = int(y.max()) + 1
            targets = y
        elif loss == "mse":
            if y.dim() == 1 and not y.is_floating_point():
                num_classes = int(y.max()) + 1
                targets = loss_targets("mse", y, num_classes, X.dtype)
            elif y.dim() == 2:
                num_classes, targets = y.shape[1], y.to(X.dtype)
            else:
                return (f"loss='mse' needs one-hot targets y of shape (n, C) or class indices; "
                        f"got {y.dtype} of shape {tuple(y.shape)}")
        else:
            return f"supports loss='cross_entropy' or 'mse', not {loss!r}"
        if model_init_fn is None:
            model_init_fn = partial(build_model, RUN_DEFAULTS["model"], in_features=X.shape[1],
                                    num_classes=num_classes, seed=0,
                                    device=X.device if device is None else device)
        if device is not None:
            X, y, targets = X.to(device), y.to(device), targets.to(device)
        return X, y, targets, loss, model_init_fn

    def _device(self) -> torch.device:
        """The ``device`` parameter, checked (``ValueError`` for a missing GPU)."""
        return resolve_device(getattr(self, "device", RUN_DEFAULTS["device"]))

    def skip(self, X=None, y=None, framework: str = "pytorch", model_init_fn=None,
             loss: str | None = None, **objective_dict):
        if framework != "pytorch":
            return True, f"{self.name} is a PyTorch solver (framework={framework!r})"
        if X is None or y is None:
            return True, f"{self.name} needs the training data as X, y in get_objective()"
        try:
            device = self._device()
        except (ValueError, RuntimeError) as err:  # a missing GPU, an unknown device string
            return True, f"{self.name}[device={getattr(self, 'device', None)}]: {err}"
        problem = self._problem(X, y, loss, model_init_fn, device)
        if isinstance(problem, str):
            return True, f"{self.name} {problem}"
        X, _, targets, loss, model_init_fn = problem
        try:  # one dry step on a fresh model: does this optimizer run on this model and loss?
            model = model_init_fn().to(device)  # a fresh model, discarded after the dry step
            opt = build_optimizer(self.name, model, self._optimizer_kwargs(), loss=loss)
            batch = slice(0, min(self.batch_size, len(X)))
            train_step(opt, model, build_loss(loss), X[batch], targets[batch], reevaluate=False)
        except Exception as err:  # noqa: BLE001 - any failure is a reason to skip, stated
            return True, (f"{self.name} cannot run on this objective's model and data: "
                          f"{type(err).__name__}: {err}")
        return False, None

    def _optimizer_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in self.parameters if k not in RUNNER_PARAMETERS}

    # ------------------------------------------------------------------ benchopt API
    def set_objective(self, X, y, model_init_fn=None, loss: str | None = None,
                      framework: str = "pytorch", track_batch_loss_change: bool = False,
                      **unused):
        self.torch_device = self._device()
        problem = self._problem(X, y, loss, model_init_fn, self.torch_device)
        if isinstance(problem, str):
            raise ValueError(f"{self.name} {problem}")
        self.X, self.y, self.targets, self.loss_kind, self.model_init_fn = problem
        self.loss_fn = build_loss(self.loss_kind)
        self.track = bool(track_batch_loss_change)
        try:
            self.seed = int(self.get_seed(use_repetition=True))
        except (ValueError, AttributeError):  # outside a benchopt run context
            self.seed = 0

    def get_next(self, stop_val):
        """Evaluate after every epoch."""
        return stop_val + 1

    def run(self, cb):
        self.model = self.model_init_fn().to(self.torch_device)
        self.optimizer = build_optimizer(self.name, self.model, self._optimizer_kwargs(),
                                         loss=self.loss_kind)
        self._batch_change, self._exact_fraction = math.nan, math.nan
        gen = torch.Generator(device="cpu").manual_seed(self.seed)  # same batches on any device
        n = len(self.y)
        while cb():
            order = torch.randperm(n, generator=gen, device="cpu").to(self.torch_device)
            changes, exact = [], []
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                try:
                    res = train_step(self.optimizer, self.model, self.loss_fn, self.X[idx],
                                     self.targets[idx], reevaluate=self.track)
                except FloatingPointError as err:  # includes gnrev's NonFiniteError
                    warnings.warn(f"{self.name}: stopping, non-finite step: {err}",
                                  stacklevel=2)
                    return
                changes.append(res.pct_change)
                if res.exact is not None:
                    exact.append(float(res.exact))
            if self.track:
                self._batch_change = sum(changes) / len(changes) if changes else math.nan
                self._exact_fraction = sum(exact) / len(exact) if exact else math.nan

    def get_result(self):
        result = dict(model=self.model)
        if self.track:
            result.update(batch_loss_change=self._batch_change,
                          exact_step_fraction=self._exact_fraction)
        return result


def make_solver(name: str) -> type[RegistrySolver]:
    """The benchopt solver class of registry optimizer ``name`` (``gnrev.`` optional for
    built-ins); its ``name`` is the registered name and its ``parameters`` are
    ``batch_size``, ``device`` and the entry's defaults (an entry whose defaults name one of
    :data:`RUNNER_PARAMETERS` is a ``ValueError``: the runner's parameter would hide it)."""
    reg = get_registry()
    name = reg.resolve_name("optimizer", name)
    entry = reg.entry("optimizer", name)
    if clash := sorted(set(entry.defaults) & set(RUNNER_PARAMETERS)):
        raise ValueError(f"optimizer {name!r} registers options {clash}, which are the benchopt "
                         "solver's own parameters (mini-batch size, torch device); rename them")
    parameters = {**RegistrySolver.parameters, **{k: [v] for k, v in entry.defaults.items()}}
    doc = (f"``{name}`` ({entry.description or entry.target}; from {entry.source.describe()}) "
           "as a benchopt solver.")
    return type("Solver", (RegistrySolver,), dict(name=name, parameters=parameters, __doc__=doc,
                                                  __module__=__name__))
