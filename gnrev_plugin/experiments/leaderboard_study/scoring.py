"""AlgoPerf-style scoring of the leaderboard study, from run logs only.

Per problem ``p``, targets from the final runs (median over seeds of each contestant's last row):

* validation accuracy: ``a*_p = f · max_o median_s acc_val(o, s)`` (``f = target_fraction``);
* train loss: ``ℓ*_p = c · min_o median_s ℓ_train(o, s)`` (``c = loss_target_factor``).

Time (and steps) to a target of a run: the ``time_s`` (``steps``) of its first logged row at the
target; ``∞`` if none. A contestant's value is the median over its seeds. Performance profile
(Dolan & Moré 2002, as AlgoPerf scores): with ``r_{p,o} = t_{p,o} / min_{o'} t_{p,o'}``,

.. math::
    \\rho_o(\\tau) = \\frac{1}{|P|} \\#\\{p : r_{p,o} \\le \\tau\\}, \\qquad
    B_o = \\frac{1}{\\tau_{max} - 1} \\int_1^{\\tau_{max}} \\rho_o(\\tau)\\, d\\tau \\quad (\\tau_{max} = 4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["TARGETS", "first_reach", "median_or_inf", "problem_targets", "time_to_targets",
           "profile", "profile_score"]

#: target name → (row key, "max" if larger is better else "min")
TARGETS = {"val_acc": ("test_acc", "max"), "train_loss": ("train_loss", "min")}


def first_reach(rows: Sequence[dict], key: str, target: float, better: str) -> dict | None:
    """The first row whose ``key`` reaches ``target`` (``≥`` for ``max``, ``≤`` for ``min``)."""
    for r in rows:
        v = r.get(key)
        if v is not None and math.isfinite(v) and (v >= target if better == "max" else v <= target):
            return r
    return None


def median_or_inf(values: Sequence[float]) -> float:
    """Median of ``values`` (``∞`` entries count as larger than all); ``∞`` for none."""
    return statistics.median(values) if values else math.inf


def problem_targets(final: dict[str, list[list[dict]]], target_fraction: float,
                    loss_target_factor: float) -> dict[str, float | None]:
    """``{"val_acc": a*, "train_loss": ℓ*}`` of one problem from ``{contestant: [rows per seed]}``.

    Args:
        final: each contestant's final runs (one list of log rows per seed).
        target_fraction: ``f``.
        loss_target_factor: ``c``.

    Returns:
        The two targets (``None`` when no run finished).
    """
    accs, losses = [], []
    for runs in final.values():
        last = [rows[-1] for rows in runs if rows]
        acc = [r["test_acc"] for r in last if r.get("test_acc") is not None]
        loss = [r["train_loss"] for r in last if r.get("train_loss") is not None
                and math.isfinite(r["train_loss"])]
        if acc:
            accs.append(statistics.median(acc))
        if loss:
            losses.append(statistics.median(loss))
    return {"val_acc": target_fraction * max(accs) if accs else None,
            "train_loss": loss_target_factor * min(losses) if losses else None}


def time_to_targets(runs: list[list[dict]], targets: dict[str, float | None]) -> dict[str, float]:
    """Median over seeds of the time and the steps to each target (``∞``: not reached).

    Args:
        runs: one list of log rows per seed.
        targets: :func:`problem_targets`' output.

    Returns:
        ``{"<target>_time_s": ..., "<target>_steps": ..., "<target>_reached": k}``.
    """
    out: dict[str, float] = {}
    for name, (key, better) in TARGETS.items():
        times, steps, reached = [], [], 0
        for rows in runs:
            hit = None if targets[name] is None else first_reach(rows, key, targets[name], better)
            reached += hit is not None
            times.append(math.inf if hit is None else float(hit["time_s"]))
            steps.append(math.inf if hit is None else float(hit["steps"]))
        out[f"{name}_time_s"] = median_or_inf(times)
        out[f"{name}_steps"] = median_or_inf(steps)
        out[f"{name}_reached"] = reached
    return out


def profile(times: dict[str, dict[str, float]], taus: Sequence[float]) -> dict[str, list[float]]:
    """``ρ_o(τ)`` at each ``τ`` from ``{problem: {contestant: t}}``.

    Args:
        times: per problem, each contestant's time to the target (``∞``: unsolved).
        taus: the ``τ`` grid.

    Returns:
        ``{contestant: [ρ_o(τ) for τ in taus]}``.
    """
    contestants = sorted({c for row in times.values() for c in row})
    ratios = {c: [] for c in contestants}
    for row in times.values():
        best = min(row.values(), default=math.inf)
        for c in contestants:
            t = row.get(c, math.inf)
            ratios[c].append(t / best if math.isfinite(best) and best > 0 and math.isfinite(t) else math.inf)
    n = max(1, len(times))
    return {c: [sum(r <= tau for r in rs) / n for tau in taus] for c, rs in ratios.items()}


def profile_score(times: dict[str, dict[str, float]], tau_max: float = 4.0) -> dict[str, float]:
    """``B_o``: the profile integrated exactly over ``[1, τ_max]`` and divided by ``τ_max − 1``.

    Args:
        times: as for :func:`profile`.
        tau_max: upper limit.

    Returns:
        ``{contestant: B_o}`` in ``[0, 1]``.
    """
    contestants = sorted({c for row in times.values() for c in row})
    n = max(1, len(times))
    score = {c: 0.0 for c in contestants}
    for row in times.values():
        best = min(row.values(), default=math.inf)
        if not (math.isfinite(best) and best > 0):
            continue
        for c in contestants:
            r = row.get(c, math.inf) / best
            if r <= tau_max:
                score[c] += (tau_max - max(r, 1.0)) / (tau_max - 1.0) / n
    return score
