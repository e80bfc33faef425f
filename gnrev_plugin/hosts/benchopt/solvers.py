"""benchopt solvers: exact Gauss-Newton, dense GN, Adam and SGD on one torch base solver.

Every solver trains ``model = model_init_fn()`` by mini-batch epochs and is sampled once per epoch
(``sampling_strategy = "callback"``, ``get_next(k) = k + 1``, the pattern of benchopt's
``benchmark_resnet_classif``): ``run(cb)`` is ``while cb(): one_epoch()``, and ``cb()`` takes no
argument (benchopt ≥ 1.10). Only the optimizer differs between solvers:

* :class:`ExactGN`: :class:`gnrev_plugin.optim.ExactGN` on a :class:`~gnrev_plugin.nn.RevMLP`; one
  step moves the linearised logits on the batch by ``J Δθ = −α ε`` (``α = lr``, ``ε`` the Newton
  target of the loss), at about the cost of a gradient step;
* :class:`DenseGN`: :class:`gnrev_plugin.optim.DenseGN`, the same step for any ``nn.Module`` through
  the dense output-space system (skipped when that system would not fit ``max_dense_entries``);
* :class:`Adam`, :class:`SGD`: ``torch.optim`` baselines.

The objective hands the solvers (``Objective.get_objective()``)::

    X, y                  training inputs (n, d) and class indices (n,)  (tensors or numpy arrays)
    model_init_fn         optional zero-argument callable → nn.Module (default: a RevMLP built
                          from X's width and y's classes, so GN joins benchmarks that only give data)
    loss                  optional "cross_entropy" (default for integer y) or "mse"
    framework             optional; solvers skip anything but "pytorch"
    track_batch_loss_change   optional; if true the result also carries the epoch's mean
                          per-batch loss change and, for GN solvers, the fraction of exact steps

and the result is ``dict(model=model)`` (plus ``batch_loss_change``, ``exact_step_fraction`` when
tracking), the contract of benchopt's DL benchmarks.
"""

from __future__ import annotations

import math
import warnings

import torch
from benchopt import BaseSolver
from benchopt.stopping_criterion import SufficientProgressCriterion
from torch import nn

from gnrev_plugin.hosts.benchopt.problem import as_tensor, build_model, percent_loss_change

__all__ = ["TorchSolver", "ExactGN", "DenseGN", "Adam", "SGD"]


def _loss_fn(kind: str):
    if kind == "cross_entropy":
        return nn.functional.cross_entropy
    if kind == "mse":
        return nn.functional.mse_loss
    raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {kind!r}")


class TorchSolver(BaseSolver):
    """Base solver: epoch-wise mini-batch training of ``model_init_fn()`` with one optimizer.

    Subclasses set ``name``, ``parameters`` and implement :meth:`make_optimizer`; they may
    override :meth:`step` (one update on a batch, returning the batch loss before the update).
    Parameters common to all: ``lr`` and ``batch_size``; the epoch order is shuffled with a
    generator seeded by benchopt's run seed, so every solver sees the same batches.
    """

    name = "torch-base"
    requirements = ["pip::torch"]
    sampling_strategy = "callback"
    stopping_criterion = SufficientProgressCriterion(
        eps=1e-8, patience=5, strategy="callback", key_to_monitor="objective_value"
    )
    parameters = {"lr": [0.1], "batch_size": [128]}

    # ------------------------------------------------------------------ benchopt API
    def skip(self, X=None, y=None, framework: str = "pytorch", **objective_dict):
        if framework != "pytorch":
            return True, f"{self.name} is a PyTorch solver (framework={framework!r})"
        if X is None or y is None:
            return True, f"{self.name} needs the training data as X, y in get_objective()"
        return False, None

    def set_objective(self, X, y, model_init_fn=None, loss: str | None = None,
                      framework: str = "pytorch", track_batch_loss_change: bool = False,
                      **unused):
        self.X = as_tensor(X, dtype=torch.get_default_dtype())
        self.y = as_tensor(y)
        if self.X.dim() > 2:
            self.X = self.X.flatten(1)
        if loss is None:
            loss = "mse" if self.y.is_floating_point() else "cross_entropy"
        self.loss_kind = loss
        self.loss_fn = _loss_fn(loss)
        if model_init_fn is None:
            num_classes = int(self.y.max()) + 1 if loss == "cross_entropy" else self.y.shape[-1]
            model_init_fn = _default_revmlp(self.X.shape[1], num_classes)
        self.model_init_fn = model_init_fn
        self.track = bool(track_batch_loss_change)
        try:
            self.seed = int(self.get_seed(use_repetition=True))
        except (ValueError, AttributeError):  # outside a benchopt run context
            self.seed = 0

    def get_next(self, stop_val):
        """Evaluate after every epoch."""
        return stop_val + 1

    def run(self, cb):
        torch.manual_seed(self.seed)
        self.model = self.model_init_fn()
        self.optimizer = self.make_optimizer(self.model)
        self._batch_change, self._exact_fraction = math.nan, math.nan
        gen = torch.Generator().manual_seed(self.seed)
        n = len(self.y)
        while cb():
            order = torch.randperm(n, generator=gen)
            changes, exact = [], []
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                xb, yb = self.X[idx], self.y[idx]
                try:
                    loss_before = self.step(xb, yb)
                except FloatingPointError as err:  # includes gnrev's NonFiniteError
                    warnings.warn(f"{self.name}: stopping, non-finite step: {err}")
                    return
                if self.track:
                    with torch.no_grad():
                        after = float(self.loss_fn(self.model(xb), yb))
                    changes.append(percent_loss_change(loss_before, after))
                    flag = getattr(self.optimizer, "last_step_exact", None)
                    if flag is not None:
                        exact.append(float(bool(flag)))
            if self.track:
                self._batch_change = sum(changes) / len(changes) if changes else math.nan
                self._exact_fraction = sum(exact) / len(exact) if exact else math.nan

    def get_result(self):
        result = dict(model=self.model)
        if self.track:
            result.update(batch_loss_change=self._batch_change,
                          exact_step_fraction=self._exact_fraction)
        return result

    # ------------------------------------------------------------------ hooks
    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        """One update on the batch ``(xb, yb)`` in the standard drop-in loop
        (``zero_grad; loss.backward(); step``); returns ``ℓ_B(θ_t)``."""
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(xb), yb)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _default_revmlp(in_features: int, num_classes: int):
    from functools import partial

    return partial(build_model, "revmlp", in_features, num_classes, hidden=256, num_blocks=2)


class ExactGN(TorchSolver):
    """Exact Gauss-Newton on a reversible RevMLP (Buffelli et al., NeurIPS 2024).

    ``lr = α``: the linearised logits on the batch move by ``J Δθ = −α ε`` (default 0.2: the
    paper's MNIST mini-batch GN, reference lr 0.1 with L = 2 blocks). ``fast_path=True``
    uses ``step_on_batch`` (no parameter backward); ``False`` the drop-in ``backward(); step()``.
    ``rank_policy`` is ExactGN's (``"warn"`` records inexact steps in ``exact_step_fraction``
    rather than stopping the run).
    """

    name = "ExactGN"
    parameters = {"lr": [0.2], "batch_size": [128], "fast_path": [True],
                  "rank_policy": ["warn"]}

    def skip(self, X=None, y=None, framework="pytorch", model_init_fn=None, model_kind=None,
             **objective_dict):
        skip, reason = super().skip(X=X, y=y, framework=framework)
        if skip:
            return skip, reason
        if model_kind is not None and model_kind != "revmlp":
            return True, (f"ExactGN needs a reversible RevMLP (model={model_kind!r}); "
                          "use DenseGN for other models")
        return False, None

    def make_optimizer(self, model):
        from gnrev_plugin.nn import RevMLP
        from gnrev_plugin.optim import ExactGN as ExactGNOptimizer

        if not isinstance(model, RevMLP):
            raise TypeError(f"ExactGN needs a gnrev_plugin.nn.RevMLP, got {type(model).__name__};"
                            " use the DenseGN solver for other models")
        return ExactGNOptimizer(model.parameters(), lr=self.lr, loss=self.loss_kind, model=model,
                                rank_policy=self.rank_policy)

    def step(self, xb, yb):
        if self.fast_path:
            return float(self.optimizer.step_on_batch(xb, yb))
        return super().step(xb, yb)


class DenseGN(TorchSolver):
    """Exact Gauss-Newton for any ``nn.Module`` via the dense output-space system.

    Skipped when ``batch_size · C · P`` (the entries of the batch Jacobian) exceeds
    ``max_dense_entries``. ``damping = λ`` regularises the system as ``(J Jᵀ + λ I)``;
    ``rank_policy="warn"`` takes the least-squares step ``J⁺`` when ``J Jᵀ`` is singular (recorded
    in ``exact_step_fraction``) instead of stopping the run.
    """

    name = "DenseGN"
    parameters = {"lr": [0.2], "batch_size": [128], "damping": [0.0], "rank_policy": ["warn"],
                  "max_dense_entries": [50_000_000]}

    def skip(self, X=None, y=None, framework="pytorch", model_init_fn=None, **objective_dict):
        skip, reason = super().skip(X=X, y=y, framework=framework)
        if skip:
            return skip, reason
        import gnrev_plugin.optim as gn_optim

        if not hasattr(gn_optim, "DenseGN"):
            return True, "gnrev_plugin.optim.DenseGN is not available in this gnrev-plugin"
        if model_init_fn is None:
            return False, None
        probe = model_init_fn()
        num_params = sum(p.numel() for p in probe.parameters() if p.requires_grad)
        x = as_tensor(X, dtype=torch.get_default_dtype())
        with torch.no_grad():
            out_dim = probe(x[:1].flatten(1) if x.dim() > 2 else x[:1]).numel()
        entries = min(self.batch_size, len(x)) * out_dim * num_params
        if entries > self.max_dense_entries:
            return True, (f"DenseGN: the batch Jacobian would have {entries:.3g} entries > "
                          f"max_dense_entries={self.max_dense_entries:.3g} (P={num_params}); "
                          "lower batch_size or the model size, or raise max_dense_entries")
        return False, None

    def make_optimizer(self, model):
        from gnrev_plugin.optim import DenseGN as DenseGNOptimizer

        return DenseGNOptimizer(model.parameters(), model=model, lr=self.lr, loss=self.loss_kind,
                                damping=self.damping, rank_policy=self.rank_policy,
                                max_jacobian_entries=self.max_dense_entries)

    def step(self, xb, yb):
        step_on_batch = getattr(self.optimizer, "step_on_batch", None)
        if step_on_batch is not None:
            return float(step_on_batch(xb, yb))
        return super().step(xb, yb)


class Adam(TorchSolver):
    """``torch.optim.Adam`` (the paper's best mini-batch baseline, lr 1e-4 on MNIST at M=8000)."""

    name = "Adam"
    parameters = {"lr": [1e-3], "batch_size": [128]}

    def make_optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.lr)


class SGD(TorchSolver):
    """``torch.optim.SGD`` with optional heavy-ball ``momentum``."""

    name = "SGD"
    parameters = {"lr": [0.1], "batch_size": [128], "momentum": [0.0]}

    def make_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)
