"""The training engine: the one epoch loop every runner trains through, with callbacks.

* :mod:`.runner`: :func:`train_run`, one :class:`~gnrev_plugin.build.RunSpec` built through the
  registry and trained into a run directory, resumable exactly;
* :mod:`.loop`: the epoch loop (:func:`run_epochs`) and its :class:`EpochPlan` (a row every k
  epochs, batch re-evaluation, batch order);
* :mod:`.callbacks`: what runs add to the loop, per epoch, every k epochs and on divergence;
* :mod:`.checkpoint`: checkpoint and resume;
* :mod:`.rundir`: run directories (``config.json``, JSONL logs, atomic writes, checkpoints) and
  their reader for the leaderboard (:func:`~.rundir.read_runs`);
* :mod:`.sweep`: crash-tolerant sweeps of jobs;
* :mod:`.launch`: the launcher of ``N`` local processes (``gnrev train --nproc N``).

Imports point one way: core (``nn``, ``optim``, ``metrics``) ← registry/build/data ← ``engine``
← ``experiments`` ← ``commands``; the engine imports no host adapter.
"""

from .callbacks import (
    BatchLossChange,
    Callback,
    Diagnostics,
    EpochEnd,
    Interrupted,
    StopOnDivergence,
    WallTime,
)
from .loop import EpochPlan, TrainState, run_epochs
from .rundir import RunDir
from .runner import train_run
from .sweep import Job, run_jobs

__all__ = ["train_run", "EpochPlan", "TrainState", "run_epochs", "Callback", "BatchLossChange",
           "WallTime", "Diagnostics", "EpochEnd", "StopOnDivergence", "Interrupted", "RunDir",
           "Job", "run_jobs"]
