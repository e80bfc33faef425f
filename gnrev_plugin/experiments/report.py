"""``report.md`` and figures of a reproduction directory, rebuilt from its logs alone.

:func:`build_report` reads ``OUT/config.json`` (which experiment) and dispatches to the
experiment's report builder; nothing is recomputed from models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tabulate import tabulate

from .rundir import RunDir, atomic_write_text, read_jsonl
from .sweep import sweep_status

__all__ = ["build_report", "collect_runs", "fmt", "mean_std", "failures_section", "write_report"]


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


def mean_std(values) -> tuple[float, float, int]:
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
    failed = [r for r in sweep_status(out).values() if r["status"] != "ok"]
    if not failed:
        return ""
    rows = [[r["run"], r["error"]] for r in failed]
    return ("\n## Failed runs\n\nThese configurations crashed; every other result above is "
            "complete. Tracebacks are in each run's `error.txt`.\n\n"
            + tabulate(rows, headers=["run", "error"], tablefmt="github") + "\n")


def write_report(out: Path, text: str) -> Path:
    path = Path(out) / "report.md"
    atomic_write_text(path, text)
    return path


def build_report(out: str | Path) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs."""
    out = Path(out)
    cfg_path = out / RunDir.CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{out} is not a reproduction directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    exp = cfg.get("experiment")
    if exp == "exact-gn":
        from .exact_gn_report import build_exact_gn_report as builder
    elif exp == "conditioning":
        from .conditioning_repro import build_conditioning_report as builder
    elif exp == "nme":
        from .nme_repro import build_nme_report as builder
    else:
        raise ValueError(f"{cfg_path} names an unknown experiment {exp!r}")
    return builder(out, cfg)


def read_rows(path: Path) -> list[dict]:
    return read_jsonl(path)
