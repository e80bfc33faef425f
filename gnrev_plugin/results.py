"""The common shape of a training result, as every reader returns it.

Each result format has its reader next to its writer: benchopt files in
:mod:`gnrev_plugin.hosts.benchopt.results`, DeepOBS folders in the DeepOBS host, gnrev run
directories in :mod:`gnrev_plugin.engine.rundir`. They all return :class:`Curve` objects,
which the leaderboard (:mod:`gnrev_plugin.hosts.leaderboard`) summarises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Point", "Curve", "finite_or_none"]


@dataclass
class Point:
    """One evaluation of a run: epoch, optimizer steps and wall time so far, and the metrics."""

    epoch: float | None = None
    steps: float | None = None
    time: float | None = None
    train_loss: float | None = None
    test_loss: float | None = None
    test_acc: float | None = None


@dataclass
class Curve:
    """One run: ``source`` (benchopt / deepobs / gnrev), ``problem``, ``optimizer``, ``seed``."""

    source: str
    problem: str
    optimizer: str
    seed: str
    points: list[Point] = field(default_factory=list)


def finite_or_none(v) -> float | None:
    """``float(v)`` if it is a finite number, else ``None``."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
