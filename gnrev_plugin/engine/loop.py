"""The epoch loop: the one place in the package that walks the epochs of a training run.

Epoch ``0`` is the initial model; epoch ``e ≥ 1`` first takes the optimizer steps of the ``e``-th
pass over the training set (batches in the order ``plan.batch_order(n, seed, e)``), then, when the
epoch is due (:meth:`EpochPlan.due`), evaluates the model, logs one row to ``log.jsonl`` and saves
a checkpoint. A row holds ``epoch``, the loss and accuracy on the whole training set (and on the
test set when the data has one), the spec's run metrics on the probe batch, and whatever the
callbacks measure (:class:`~gnrev_plugin.engine.callbacks.Callback`).

A step *diverges* when the optimizer refuses it as non-finite
(:class:`~gnrev_plugin.optim.errors.NonFiniteError`, parameters unchanged) or the last loss it
measured is not finite (``ℓ_B(θ_{t+1})`` when the plan re-evaluates the batch, else
``ℓ_B(θ_t)``). The callbacks' ``on_divergence`` decide: one that returns ``True`` ends the run
after a last row at that epoch (:class:`~gnrev_plugin.engine.callbacks.StopOnDivergence`);
otherwise the error is raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gnrev_plugin import data as gdata
from gnrev_plugin.build import RunSpec, evaluate_run_metrics
from gnrev_plugin.optim.errors import NonFiniteError
from gnrev_plugin.stepping import StepResult, evaluate, train_step

from .launch import local_rows
from .rundir import RunDir

__all__ = ["EpochPlan", "TrainState", "run_epochs", "epoch_row", "in_order",
           "permutation_of_previous_epoch"]


def in_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The samples in their stored order, every epoch (full-batch gradient descent).

    Args:
        n: number of training samples.
        seed: the run's seed (unused).
        epoch: the epoch (unused).

    Returns:
        ``arange(n)``.
    """
    return torch.arange(n)


def permutation_of_previous_epoch(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``e`` shuffled as :func:`gnrev_plugin.data.epoch_permutation` shuffles ``e − 1``:
    the batch order the NME and sharpness reproductions were recorded with.

    Args:
        n: number of training samples.
        seed: the run's seed.
        epoch: the epoch ``e ≥ 1``.

    Returns:
        ``epoch_permutation(n, seed, e − 1)``.
    """
    return gdata.epoch_permutation(n, seed, epoch - 1)


@dataclass(frozen=True)
class EpochPlan:
    """How the loop walks a run's epochs.

    Attributes:
        every: a row (and a checkpoint) at epoch 0, every ``every``-th epoch and the last one.
        reevaluate: re-evaluate the batch loss after each step (``ℓ_B(θ_{t+1})``, needed for
            the per-batch loss change); ``False`` saves one forward pass per step.
        batch_order: ``batch_order(n, seed, epoch)``, the order of the training samples in epoch
            ``epoch ≥ 1`` (a function of its arguments only, so that resume is exact); the
            default is :func:`gnrev_plugin.data.epoch_permutation`.
    """

    every: int = 1
    reevaluate: bool = True
    batch_order: Callable[[int, int, int], torch.Tensor] = gdata.epoch_permutation

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be ≥ 1, got {self.every}")

    def due(self, epoch: int, last: int) -> bool:
        """Whether epoch ``epoch`` of a run of ``last`` epochs gets a row.

        Args:
            epoch: the epoch (0 = the initial model).
            last: the run's last epoch.

        Returns:
            ``epoch % every == 0`` or ``epoch == last``.
        """
        return epoch % self.every == 0 or epoch == last


@dataclass
class TrainState:
    """Everything a callback may read: the built run and its data on the model's device.

    ``t_*`` are the loss's targets (:func:`gnrev_plugin.build.loss_targets`); ``x_test`` is
    ``None`` for data without a test set. Only the root process (``root``) logs and
    checkpoints; ``reduce`` turns a shard's mean loss into the global batch's on several
    processes. ``stop_reason`` is set when a divergence ended the run.
    """

    spec: RunSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    initial_model: nn.Module
    metrics: dict
    dataset: gdata.Dataset
    run: RunDir
    x_train: torch.Tensor
    y_train: torch.Tensor
    t_train: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    t_test: torch.Tensor | None = None
    root: bool = True
    world: int = 1
    reduce: Callable[[float, int], float] | None = None
    stop_reason: str | None = None

    @property
    def steps_per_epoch(self) -> int:
        """``⌈n / batch size⌉`` optimizer steps per epoch."""
        return -(-len(self.y_train) // self.spec.batch_size)


def epoch_row(state: TrainState, epoch: int, callbacks: Sequence) -> dict:
    """The row of ``epoch``: loss and accuracy on the training (and test) set, the spec's run
    metrics on the first ``probe_size`` training samples, then each callback's measurements.

    Args:
        state: the run.
        epoch: the epoch the row describes.
        callbacks: measured in this order (:meth:`Callback.measure`), each seeing the row so far.

    Returns:
        The row (not yet written).
    """
    s = state
    train_loss, train_acc = evaluate(s.model, s.loss_fn, s.x_train, s.y_train, s.t_train)
    row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc)
    if s.x_test is not None:
        row["test_loss"], row["test_acc"] = evaluate(s.model, s.loss_fn, s.x_test, s.y_test,
                                                     s.t_test)
    p = s.spec.probe_size
    row.update(evaluate_run_metrics(s.metrics, s.model, inputs=s.x_train[:p],
                                    targets=s.t_train[:p], loss_fn=s.loss_fn,
                                    initial_model=s.initial_model))
    for cb in callbacks:
        if cb.due(epoch, s.spec.epochs) or s.stop_reason is not None:
            row.update(cb.measure(s, epoch, row))
    return row


def _step(state: TrainState, plan: EpochPlan, epoch: int, idx: torch.Tensor
          ) -> tuple[StepResult | None, BaseException | str | None]:
    """One step on the batch ``idx``; returns ``(result, None)`` or ``(result?, divergence)``."""
    s = state
    try:
        res = train_step(s.optimizer, s.model, s.loss_fn, s.x_train[idx], s.t_train[idx],
                         reevaluate=plan.reevaluate, reduce=s.reduce)
    except NonFiniteError as err:
        return None, err
    if plan.reevaluate and not math.isfinite(res.loss_after):
        return res, f"non-finite loss after a step at epoch {epoch}"
    if not plan.reevaluate and not math.isfinite(res.loss_before):
        return res, "non-finite training loss"
    return res, None


def _diverged(state: TrainState, epoch: int, why: BaseException | str, callbacks: Sequence
              ) -> None:
    """Ask the callbacks; record the stop, or raise when none handles the divergence."""
    reason = str(why)
    handled = [bool(cb.on_divergence(state, epoch, reason)) for cb in callbacks]
    if not any(handled):
        if isinstance(why, BaseException):
            raise why
        raise FloatingPointError(reason)
    state.stop_reason = reason


def _train_epoch(state: TrainState, plan: EpochPlan, epoch: int, callbacks: Sequence,
                 bar) -> None:
    """The steps of epoch ``epoch``; stops early (``state.stop_reason``) on a handled
    divergence."""
    s = state
    for cb in callbacks:
        cb.on_epoch_start(s, epoch)
    n, batch = len(s.y_train), s.spec.batch_size
    order = plan.batch_order(n, s.spec.seed, epoch).to(s.x_train.device)
    for start in range(0, n, batch):
        idx = order[start:start + batch]
        if s.world > 1:
            idx = local_rows(idx)
        res, why = _step(s, plan, epoch, idx)
        if why is not None:
            _diverged(s, epoch, why, callbacks)
            return
        for cb in callbacks:
            cb.on_step(s, epoch, res)
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss_after if plan.reevaluate else res.loss_before:.3g}")


def _log(state: TrainState, epoch: int, callbacks: Sequence, save: Callable[[int], None]
         ) -> dict | None:
    """Row, then checkpoint, of a due epoch (root only); the callbacks hear of both."""
    if not state.root:      # other ranks hold the same model; rank 0 evaluates and logs
        return None
    row = epoch_row(state, epoch, callbacks)
    state.run.log(row)
    for cb in callbacks:
        cb.on_row_logged(state, row)
    save(epoch)
    for cb in callbacks:
        cb.on_checkpoint(state, row)
    return row


def run_epochs(state: TrainState, plan: EpochPlan, callbacks: Sequence, start: int,
               save: Callable[[int], None], progress: bool = True, desc: str = "") -> dict | None:
    """Train epochs ``start … spec.epochs`` (epoch 0 is the row of the initial model).

    Args:
        state: the built run (:class:`TrainState`).
        plan: rows, re-evaluation and batch order (:class:`EpochPlan`).
        callbacks: :class:`~gnrev_plugin.engine.callbacks.Callback` objects, called in order.
        start: the first epoch to run (``checkpoint epoch + 1`` on resume).
        save: ``save(epoch)`` writes the checkpoint after the row of ``epoch``.
        progress: show a tqdm bar (root process only).
        desc: the bar's label.

    Returns:
        The last row written by this call (``None`` if none, and on non-root processes).
    """
    from tqdm.auto import tqdm

    last, row = state.spec.epochs, None
    for cb in callbacks:
        cb.on_train_start(state, start)
    if start == 0:
        row = _log(state, 0, callbacks, save)
        start = 1
    bar = tqdm(total=max(0, last - start + 1) * state.steps_per_epoch, desc=desc,
               disable=not (progress and state.root), leave=False, dynamic_ncols=True)
    try:
        for epoch in range(start, last + 1):
            _train_epoch(state, plan, epoch, callbacks, bar)
            if state.stop_reason is not None or plan.due(epoch, last):
                row = _log(state, epoch, callbacks, save) or row
            if state.stop_reason is not None:
                break
    finally:
        bar.close()
    return row
