"""Callbacks: what a run adds to the engine's epoch loop (:mod:`gnrev_plugin.engine.loop`).

A :class:`Callback` may act at each point of an epoch (all methods optional):

* ``on_train_start(state, epoch)``: once, before the first epoch this session runs;
* ``on_epoch_start(state, epoch)``, ``on_step(state, epoch, result)``: around the steps;
* ``measure(state, epoch, row) -> dict``: fields of a row, on the epochs the callback is
  ``due`` (every epoch that gets a row, or only every ``every``-th with :attr:`Callback.every`);
* ``on_row_logged(state, row)``: the row is written, the checkpoint not yet;
* ``on_checkpoint(state, row)``: the row and the checkpoint of its epoch are written;
* ``on_divergence(state, epoch, reason) -> bool``: a step diverged; ``True`` ends the run after
  a last row (:class:`StopOnDivergence`), else the engine raises.

A callback with a ``state_key`` is checkpointed: ``state_dict()`` is saved under that key after
every row and ``load_state_dict(state)`` restores it on resume, so the run resumes exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gnrev_plugin.stepping import StepResult

__all__ = ["Callback", "BatchLossChange", "WallTime", "Diagnostics", "EpochEnd",
           "StopOnDivergence", "Interrupted"]


class Interrupted(BaseException):
    """A run stopped from outside (a callback simulating a kill, a user's stop): a
    ``BaseException``, like ``KeyboardInterrupt``, so sweeps do not record a crashed config."""


class Callback:
    """The base callback: every hook does nothing. Subclasses override what they need.

    Attributes:
        every: measure at epoch 0, every ``every``-th epoch and the last one (``None``: at
            every row).
        state_key: the checkpoint key of :meth:`state_dict` (``None``: not checkpointed).
    """

    every: int | None = None
    state_key: str | None = None

    def due(self, epoch: int, last: int) -> bool:
        """Whether :meth:`measure` runs at ``epoch`` of a run of ``last`` epochs.

        Args:
            epoch: the row's epoch.
            last: the run's last epoch.

        Returns:
            ``True`` without :attr:`every`; else ``epoch % every == 0 or epoch == last``.
        """
        return self.every is None or epoch % self.every == 0 or epoch == last

    def on_train_start(self, state, epoch: int) -> None:
        """Before the first epoch this session runs (``epoch``; 0 for a fresh run)."""

    def on_epoch_start(self, state, epoch: int) -> None:
        """Before the steps of epoch ``epoch ≥ 1``."""

    def on_step(self, state, epoch: int, result: StepResult) -> None:
        """After each finite step of epoch ``epoch``."""

    def measure(self, state, epoch: int, row: dict) -> dict:
        """Fields to add to the row of ``epoch`` (``row`` holds the fields so far).

        Args:
            state: the run (:class:`~gnrev_plugin.engine.loop.TrainState`).
            epoch: the row's epoch.
            row: the row so far.

        Returns:
            ``{field: value}``.
        """
        return {}

    def on_row_logged(self, state, row: dict) -> None:
        """After ``row`` is written to the log, before the checkpoint."""

    def on_checkpoint(self, state, row: dict) -> None:
        """After the checkpoint of ``row``'s epoch is written."""

    def on_divergence(self, state, epoch: int, reason: str) -> bool:
        """A step of ``epoch`` diverged; return ``True`` to end the run after a last row."""
        return False

    def state_dict(self):
        """The checkpointed state (with :attr:`state_key`)."""
        return None

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict` on resume."""


class BatchLossChange(Callback):
    """The epoch's mean per-batch loss change ``Δ_B = 100 (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)``
    (``batch_loss_change_pct``; ``…_first``: the first batch's), the fraction of exact
    Gauss-Newton steps (``exact_frac``; ``None`` for optimizers that do not report one) and the
    steps so far. Needs a plan that re-evaluates the batch."""

    def __init__(self) -> None:
        self.pcts: list[float] = []
        self.exacts: list[bool] = []

    def on_epoch_start(self, state, epoch: int) -> None:
        self.pcts, self.exacts = [], []

    def on_step(self, state, epoch: int, result: StepResult) -> None:
        self.pcts.append(result.pct_change)
        if result.exact is not None:
            self.exacts.append(result.exact)

    def measure(self, state, epoch: int, row: dict) -> dict:
        if epoch == 0:
            return dict(batch_loss_change_pct=None, exact_frac=None, steps=0)
        return dict(batch_loss_change_pct=sum(self.pcts) / len(self.pcts),
                    batch_loss_change_pct_first=self.pcts[0],
                    exact_frac=(sum(self.exacts) / len(self.exacts)) if self.exacts else None,
                    steps=epoch * state.steps_per_epoch)


class WallTime(Callback):
    """``time_s``: wall seconds of training so far, across resumed sessions (checkpointed as
    ``elapsed``). Put it last, so that it counts the other callbacks' measurements."""

    state_key = "elapsed"

    def __init__(self) -> None:
        self.elapsed, self.t0, self.last = 0.0, time.perf_counter(), 0.0

    def on_train_start(self, state, epoch: int) -> None:
        self.t0 = time.perf_counter()

    def measure(self, state, epoch: int, row: dict) -> dict:
        self.last = self.elapsed + (time.perf_counter() - self.t0)
        return {"time_s": self.last}

    def state_dict(self) -> float:
        return self.last

    def load_state_dict(self, state) -> None:
        self.elapsed = float(state or 0.0)


class Diagnostics(Callback):
    """Stateful diagnostics against the initial model: ``factory(initial_model, dataset, spec)``
    returns an object with ``measure(model, epoch) -> dict``, ``state_dict()`` and
    ``load_state_dict(state)`` (e.g. :class:`gnrev_plugin.experiments.diagnostics
    .RevMLPDiagnostics`), built when training starts and checkpointed as ``diagnostics``."""

    state_key = "diagnostics"

    def __init__(self, factory: Callable) -> None:
        self.factory, self.diag, self.pending = factory, None, None

    def _built(self, state):
        if self.diag is None:
            self.diag = self.factory(state.initial_model, state.dataset, state.spec)
            if self.pending is not None:
                self.diag.load_state_dict(self.pending)
        return self.diag

    def on_train_start(self, state, epoch: int) -> None:
        self._built(state)

    def measure(self, state, epoch: int, row: dict) -> dict:
        return self._built(state).measure(state.model, epoch)

    def state_dict(self):
        return None if self.diag is None else self.diag.state_dict()

    def load_state_dict(self, state) -> None:
        if self.diag is None:
            self.pending = state
        else:
            self.diag.load_state_dict(state)


class EpochEnd(Callback):
    """``fn(row)`` after each row and its checkpoint are written (printing, resource logs)."""

    def __init__(self, fn: Callable[[dict], None]) -> None:
        self.fn = fn

    def on_checkpoint(self, state, row: dict) -> None:
        self.fn(row)


class StopOnDivergence(Callback):
    """End a diverged run after a last row at the epoch it diverged in, instead of failing it.
    Every row gets ``diverged`` (bool); the reason is the result's ``diverged``. Checkpointed,
    so a resumed diverged run stays stopped."""

    state_key = "diverged"

    def __init__(self) -> None:
        self.reason: str | None = None

    def on_divergence(self, state, epoch: int, reason: str) -> bool:
        self.reason = reason
        return True

    def measure(self, state, epoch: int, row: dict) -> dict:
        return {"diverged": self.reason is not None}

    def state_dict(self) -> str | None:
        return self.reason

    def load_state_dict(self, state) -> None:
        self.reason = state

