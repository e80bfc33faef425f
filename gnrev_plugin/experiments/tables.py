"""Shared table helpers of the reproduction reports: read a reproduction's runs back from their
logs, summarise over seeds and write ``report.md``.

Every experiment's ``report`` module builds its tables and figures from these and from
:mod:`.plotting`; nothing is recomputed from models. The per-experiment dispatch
(``{name: Experiment}``) and :func:`~gnrev_plugin.experiments.catalog.build_report` live in
:mod:`.catalog`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from tabulate import tabulate

from gnrev_plugin.engine.rundir import RunDir, atomic_write_text
from gnrev_plugin.engine.sweep import sweep_status

__all__ = ["collect_runs", "fmt", "mean_std", "failures_section", "write_report", "spec_of"]


def collect_runs(out: Path) -> list[dict]:
    """Every run directory under ``OUT/runs`` with its config, log rows, result and error."""
    runs = []
    root = Path(out) / "runs"
    for cfg_path in sorted(root.rglob(RunDir.CONFIG)):
        run = RunDir(cfg_path.parent)
        err = run.file(RunDir.ERROR)
        runs.append(dict(name=str(cfg_path.parent.relative_to(root)), config=run.read_config(),
                         rows=run.rows(), result=run.read_result(),
                         error=err.read_text() if err.exists() else None))
    return runs


def spec_of(run: dict) -> dict:
    """The resolved run spec (:class:`~gnrev_plugin.build.RunSpec` as a dict) a run recorded in
    its ``config.json`` (``{}`` when the run has none)."""
    return (run.get("config") or {}).get("spec") or {}


def mean_std(values: Iterable) -> tuple[float, float, int]:
    """``(m, s, n)``: mean ``m = Σ v / n`` and population standard deviation
    ``s = (Σ (v − m)² / n)^{1/2}`` over the ``n`` finite values (``None``/NaN skipped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    m = sum(vals) / len(vals)
    s = (sum((v - m) ** 2 for v in vals) / len(vals)) ** 0.5
    return m, s, len(vals)


def fmt(m: float, s: float | None = None, n: int = 1, digits: int = 4, pct: bool = False) -> str:
    """``mean ± std`` (std shown for ≥ 2 values); ``–`` when missing."""
    if m is None or not math.isfinite(m):
        return "–"
    scale = 100.0 if pct else 1.0
    body = f"{m * scale:.{digits}g}"
    if s is not None and n > 1 and math.isfinite(s):
        body += f" ± {s * scale:.2g}"
    return body + ("%" if pct else "")


def failures_section(out: Path) -> str:
    """The report's "Failed runs" section (empty when every run in ``sweep.jsonl`` is ok)."""
    failed = [r for r in sweep_status(out).values() if r["status"] != "ok"]
    if not failed:
        return ""
    rows = [[r["run"], r["error"]] for r in failed]
    return ("\n## Failed runs\n\nThese configurations crashed; every other result above is "
            "complete. Tracebacks are in each run's `error.txt`.\n\n"
            + tabulate(rows, headers=["run", "error"], tablefmt="github") + "\n")


def write_report(out: Path, text: str) -> Path:
    """Write ``OUT/report.md`` atomically and return its path."""
    path = Path(out) / "report.md"
    atomic_write_text(path, text)
    return path
