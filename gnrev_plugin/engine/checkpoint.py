"""Checkpoint and resume of a training run.

A checkpoint is written after every row of the log (:mod:`gnrev_plugin.engine.loop`) and holds
``{"epoch", "model", "optimizer", "stop_reason"}`` and the state of every callback with a
``state_key`` under that key (``"diagnostics"``, ``"elapsed"``, …). On resume the model, the
optimizer and the callbacks are restored and the log is cut back to the checkpoint's epoch, so a
crash anywhere (even between a row and its checkpoint) loses at most the epochs since the last
row; the batch order of an epoch depends only on ``(seed, epoch)``, so the resumed run logs what
an uninterrupted one logs (wall times aside).
"""

from __future__ import annotations

from collections.abc import Sequence

from .loop import TrainState
from .rundir import RunFileError

__all__ = ["save_checkpoint", "restore_checkpoint", "CHECKPOINT_KEYS"]

#: The entries every checkpoint holds; one without them is refused with a clear error
#: (:class:`~gnrev_plugin.engine.rundir.RunFileError`), not a bare ``KeyError: 'model'``.
CHECKPOINT_KEYS = ("epoch", "model", "optimizer")


def save_checkpoint(state: TrainState, epoch: int, callbacks: Sequence, keep_every: int = 0
                    ) -> None:
    """Write the checkpoint of ``epoch`` into ``state.run`` (atomically), replacing the previous
    one: a run keeps one checkpoint, not one per epoch, unless ``keep_every`` asks for more.

    Args:
        state: the run.
        epoch: the epoch just logged.
        callbacks: their states are saved under their ``state_key``.
        keep_every: ``k > 0``: at an epoch divisible by ``k`` also keep a copy,
            ``checkpoint-epoch<E>.pt`` (:attr:`EpochPlan.keep_checkpoints_every`).
    """
    ckpt = dict(epoch=epoch, model=state.model.state_dict(),
                optimizer=state.optimizer.state_dict(), stop_reason=state.stop_reason)
    for cb in callbacks:
        if cb.state_key is not None:
            ckpt[cb.state_key] = cb.state_dict()
    keep = keep_every > 0 and epoch % keep_every == 0
    state.run.save_checkpoint(ckpt, keep_as=state.run.epoch_checkpoint(epoch) if keep else None)


def restore_checkpoint(state: TrainState, callbacks: Sequence) -> int:
    """Restore the run from its checkpoint, if any, and cut its log back to it.

    Args:
        state: the built run; its model, optimizer and ``stop_reason`` are restored.
        callbacks: restored from their ``state_key`` entries.

    Returns:
        The first epoch to run: ``checkpoint epoch + 1``, or 0 without a checkpoint (then the
        run directory's old log, checkpoint and result are removed).
    """
    run = state.run
    ckpt = run.load_checkpoint(required=CHECKPOINT_KEYS)
    if ckpt is None:
        if state.root:
            run.reset()
        return 0
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        path = run.file(run.CHECKPOINT)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFileError(f"the checkpoint {path} does not fit this run's model or optimizer "
                           f"({type(err).__name__}: {first}); it belongs to another run: "
                           "delete it to restart from epoch 0, or use a new --out "
                           "directory") from None
    state.stop_reason = ckpt.get("stop_reason")
    for cb in callbacks:
        if cb.state_key is not None and ckpt.get(cb.state_key) is not None:
            cb.load_state_dict(ckpt[cb.state_key])
    if state.root:
        run.truncate_log([r for r in run.rows() if r["epoch"] <= ckpt["epoch"]])
    return ckpt["epoch"] + 1
