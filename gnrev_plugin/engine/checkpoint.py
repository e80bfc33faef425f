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

__all__ = ["save_checkpoint", "restore_checkpoint"]


def save_checkpoint(state: TrainState, epoch: int, callbacks: Sequence) -> None:
    """Write the checkpoint of ``epoch`` into ``state.run`` (atomically).

    Args:
        state: the run.
        epoch: the epoch just logged.
        callbacks: their states are saved under their ``state_key``.
    """
    ckpt = dict(epoch=epoch, model=state.model.state_dict(),
                optimizer=state.optimizer.state_dict(), stop_reason=state.stop_reason)
    for cb in callbacks:
        if cb.state_key is not None:
            ckpt[cb.state_key] = cb.state_dict()
    state.run.save_checkpoint(ckpt)


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
    ckpt = run.load_checkpoint()
    if ckpt is None:
        if state.root:
            run.reset()
        return 0
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.stop_reason = ckpt.get("stop_reason")
    for cb in callbacks:
        if cb.state_key is not None and ckpt.get(cb.state_key) is not None:
            cb.load_state_dict(ckpt[cb.state_key])
    if state.root:
        run.truncate_log([r for r in run.rows() if r["epoch"] <= ckpt["epoch"]])
    return ckpt["epoch"] + 1
