"""Run a list of jobs so that one crashing config never loses the others.

Each job's outcome is appended to ``<out>/sweep.jsonl`` (``{"run", "status": "ok"|"failed",
"error", "seconds"}``); a failed job also leaves ``error.txt`` (the traceback) in its run directory.
Interruptions (``KeyboardInterrupt`` and other ``BaseException``s) are not swallowed: they stop
the sweep, and ``--resume`` continues it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .rundir import RunDir, append_jsonl, read_jsonl

__all__ = ["Job", "run_jobs", "sweep_status"]

SWEEP_LOG = "sweep.jsonl"


class Job:
    """A named unit of work writing into ``run_dir``."""

    def __init__(self, name: str, run_dir: Path, fn: Callable[[], object]) -> None:
        self.name, self.run_dir, self.fn = name, Path(run_dir), fn


def run_jobs(out: Path, jobs: list[Job], progress: bool = True, desc: str = "sweep") -> list[dict]:
    """Run ``jobs`` in order; a job that raises an ``Exception`` is recorded as failed and the
    sweep goes on.

    Args:
        out: the sweep's folder (``sweep.jsonl``).
        jobs: the jobs.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        One status dict per job: ``{"run", "status", "error", "seconds"}``.
    """
    from tqdm.auto import tqdm

    statuses = []
    for job in tqdm(jobs, desc=desc, disable=not progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        try:
            job.fn()
            st = dict(run=job.name, status="ok", error=None)
        except Exception as err:  # noqa: BLE001 - a crashing config must not stop the sweep
            tb = traceback.format_exc()
            RunDir(job.run_dir).write_error(tb)
            st = dict(run=job.name, status="failed", error=f"{type(err).__name__}: {err}")
            print(f"\n[gnrev] run {job.name} failed: {st['error']} (traceback in "
                  f"{job.run_dir / RunDir.ERROR}); continuing with the others")
        st["seconds"] = time.perf_counter() - t0
        append_jsonl(Path(out) / SWEEP_LOG, st)
        statuses.append(st)
    return statuses


def sweep_status(out: Path) -> dict[str, dict]:
    """The latest status of every run in ``<out>/sweep.jsonl``.

    Args:
        out: the sweep's folder.

    Returns:
        ``{run name: its last status dict}``.
    """
    latest: dict[str, dict] = {}
    for row in read_jsonl(Path(out) / SWEEP_LOG):
        latest[row["run"]] = row
    return latest
