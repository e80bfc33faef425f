"""Matplotlib figures (Agg backend, PNG) built from the JSONL logs only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["mean_std_curve", "plot_mean_std", "save", "COLORS", "new_figure"]

COLORS = {"exact_gn": "tab:red", "adam": "tab:blue", "sgd": "tab:green"}
LABELS = {"exact_gn": "exact GN", "adam": "Adam", "sgd": "SGD"}


def _val(v) -> float:
    return float("nan") if v is None else float(v)


def mean_std_curve(runs: Sequence[list[dict]], key: str, x: str = "epoch"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean and std over runs of ``key`` against ``x`` (aligned on the common ``x`` values).

    Returns ``(xs, mean, std, number of runs)``; NaN where no run has a value.
    """
    series = [{r[x]: _val(r.get(key)) for r in rows if x in r} for rows in runs if rows]
    if not series:
        return np.array([]), np.array([]), np.array([]), 0
    xs = sorted(set().union(*[s.keys() for s in series]))
    mat = np.array([[s.get(v, math.nan) for v in xs] for s in series], dtype=float)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(mat, axis=0)
            std = np.nanstd(mat, axis=0)
    return np.array(xs, dtype=float), mean, std, len(series)


def plot_mean_std(ax, runs: Sequence[list[dict]], key: str, label: str, color: str | None = None,
                  x: str = "epoch", logy: bool = False, marker: str | None = None) -> bool:
    """Plot mean ± std over seeds; returns False when there is nothing to plot."""
    xs, mean, std, n = mean_std_curve(runs, key, x)
    ok = np.isfinite(mean)
    if not ok.any():
        return False
    lab = f"{label} (n={n})" if n > 1 else label
    ax.plot(xs[ok], mean[ok], label=lab, color=color, marker=marker, ms=3)
    if n > 1:
        lo, hi = mean - std, mean + std
        if logy:
            lo = np.where(lo > 0, lo, mean[ok].min() * 0.5 if ok.any() else lo)
        ax.fill_between(xs[ok], lo[ok], hi[ok], color=color, alpha=0.2, lw=0)
    if logy:
        ax.set_yscale("log")
    return True


def new_figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False)
    return fig, axes


def save(fig, path: str | Path) -> Path:
    """Save as PNG atomically (render to bytes, then an atomic replace)."""
    import io

    from gnrev_plugin.engine.rundir import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
