"""``report.md``, the performance-profile plot and the loss-vs-time curves of the leaderboard study,
rebuilt from the logs alone (``gnrev report OUT``): the final runs' ``log.jsonl``, ``selection.jsonl``,
``probes.jsonl``, ``sweep.jsonl`` and the study's ``config.json``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tabulate import tabulate

from gnrev_plugin.engine.rundir import RunDir, read_jsonl

from ..plotting import new_figure, save
from ..tables import failures_section, write_report
from .run import PROBE_LOG, read_selection
from .scoring import TARGETS, problem_targets, profile, profile_score, time_to_targets

__all__ = ["build_leaderboard_study_report", "collect_final_runs", "diverged_runs"]


def collect_final_runs(out: Path) -> dict[str, dict[str, list[list[dict]]]]:
    """``{problem: {contestant: [log rows of each seed]}}`` from ``OUT/final``."""
    found: dict[str, dict[str, list[list[dict]]]] = {}
    for log in sorted((Path(out) / "final").glob("*/*/seed*/" + RunDir.LOG)):
        run = RunDir(log.parent)
        if not run.done:
            continue
        problem, contestant = log.parent.parent.parent.name, log.parent.parent.name
        found.setdefault(problem, {}).setdefault(contestant, []).append(run.rows())
    return found


def diverged_runs(out: Path) -> list[list[str]]:
    """``[run, reason]`` of every tuning or final run that ended on a divergence
    (:class:`~gnrev_plugin.engine.StopOnDivergence` records the reason in ``result.json``)."""
    rows = []
    for result in sorted(Path(out).glob("*/*/*/*/" + RunDir.RESULT)):
        reason = (RunDir(result.parent).read_result() or {}).get("diverged")
        if reason:
            rows.append([str(result.parent.relative_to(out)), reason])
    return rows


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}"


def _latest_probes(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["problem"], r["contestant"]): r for r in read_jsonl(Path(out) / PROBE_LOG)}


def _plot_profiles(out: Path, scored: dict, tau_max: float) -> Path:
    taus = np.linspace(1.0, tau_max, 200)
    fig, axes = new_figure(1, len(TARGETS))
    for ax, name in zip(axes[0], TARGETS, strict=True):
        times = {p: {c: v[f"{name}_time_s"] for c, v in row.items()} for p, row in scored.items()}
        for i, (c, rho) in enumerate(sorted(profile(times, taus).items())):
            ax.step(taus, rho, where="post", label=c, color=f"C{i % 10}")
        ax.set(xlabel="τ (time / best time)", ylabel="fraction of problems", ylim=(-0.02, 1.02),
               title=f"performance profile: {name} target")
        ax.legend(fontsize=7)
    return save(fig, Path(out) / "figures" / "performance_profile.png")


def _plot_curves(out: Path, final: dict) -> list[Path]:
    paths = []
    for problem, runs in final.items():
        fig, axes = new_figure(1, 2)
        for i, (c, seeds) in enumerate(sorted(runs.items())):
            for k, rows in enumerate(seeds):
                t = [r["time_s"] for r in rows]
                axes[0][0].plot(t, [r["train_loss"] for r in rows], color=f"C{i % 10}",
                                label=c if k == 0 else None, lw=1)
                axes[0][1].plot(t, [r["test_acc"] for r in rows], color=f"C{i % 10}",
                                label=c if k == 0 else None, lw=1)
        axes[0][0].set(xlabel="time (s)", ylabel="train loss", yscale="log", title=problem)
        axes[0][1].set(xlabel="time (s)", ylabel="validation accuracy", title=problem)
        axes[0][0].legend(fontsize=7)
        paths.append(save(fig, Path(out) / "figures" / f"curves_{problem}.png"))
    return paths


def _score_table(scored: dict, targets: dict) -> str:
    rows = []
    for p, row in scored.items():
        for c, v in sorted(row.items()):
            rows.append([p, c, _fmt(targets[p]["val_acc"], 4), _fmt(v["val_acc_time_s"]),
                         _fmt(v["val_acc_steps"]), v["val_acc_reached"], _fmt(targets[p]["train_loss"]),
                         _fmt(v["train_loss_time_s"]), _fmt(v["train_loss_steps"]), v["train_loss_reached"]])
    return tabulate(rows, headers=["problem", "contestant", "val-acc target", "time (s)", "steps",
                                   "seeds reached", "train-loss target", "time (s)", "steps",
                                   "seeds reached"], tablefmt="github")


def _cost_table(out: Path) -> str:
    probes = _latest_probes(out)
    rows = []
    for (p, c), r in sorted(probes.items()):
        adam = probes.get((p, "adam"))
        ratio = r["step_s"] / adam["step_s"] if adam and adam["step_s"] > 0 else None
        rows.append([p, c, r["optimizer"], _fmt(r["step_s"] * 1e3), _fmt(ratio), _fmt(r["state_mib"]),
                     _fmt(r["peak_mib"])])
    return tabulate(rows, headers=["problem", "contestant", "optimizer", "step (ms)", "÷ Adam",
                                   "state (MiB)", "peak Δ (MiB)"], tablefmt="github")


def _board_rows(scores: dict, cfg: dict, final: dict) -> list[list[str]]:
    """The leaderboard's rows, best first; a contestant with no finished final run solves no
    problem (``B = 0``)."""
    for name in TARGETS:
        for c in cfg.get("contestants", []):
            scores[name].setdefault(c, 0.0)
    board = sorted(scores["val_acc"], key=lambda c: (-scores["val_acc"][c], -scores["train_loss"][c], c))
    finished = {c for runs in final.values() for c in runs}
    return [[c, _fmt(scores["val_acc"][c]), _fmt(scores["train_loss"][c]),
             "" if c in finished else "no final run (every tuning trial diverged or failed)"]
            for c in board]


def build_leaderboard_study_report(out: Path, cfg: dict) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs.

    Args:
        out: the study directory.
        cfg: its ``config.json``.

    Returns:
        The report's path.
    """
    out, preset = Path(out), cfg["preset"]
    final = collect_final_runs(out)
    targets = {p: problem_targets(runs, preset["target_fraction"], preset["loss_target_factor"])
               for p, runs in final.items()}
    scored = {p: {c: time_to_targets(seeds, targets[p]) for c, seeds in runs.items()}
              for p, runs in final.items()}
    tau_max = preset["tau_max"]
    scores = {name: profile_score({p: {c: v[f"{name}_time_s"] for c, v in row.items()}
                                   for p, row in scored.items()}, tau_max) for name in TARGETS}
    figs = [_plot_profiles(out, scored, tau_max), *_plot_curves(out, final)]
    board_rows = _board_rows(scores, cfg, final)
    sel = [[r["problem"], r["contestant"], r["trial"], r["options"]] for r in read_selection(out)]
    diverged = diverged_runs(out)
    missing = [[c, why] for c, why in cfg.get("missing_contestants", {}).items()]
    missing += [[p, why] for p, why in cfg.get("missing_problems", {}).items()]
    text = f"""# Leaderboard study (preset `{cfg['preset_name']}`, device `{cfg['device']}`)

Every contestant on the same problems with the same tuning: trial 0 = the registry defaults, then
{preset['trials'] - 1} seeded random draws from its declared search space (lr and at most two main
hyperparameters; `gnrev_plugin/experiments/leaderboard_study/presets.py`), selected by the best final
**validation** accuracy (ties: lower train loss; the test split is never read), then seeds
{preset['seeds']} of the selected configuration. Targets per problem (from these final runs):
validation accuracy `{preset['target_fraction']} × best median`, train loss
`{preset['loss_target_factor']} × best median`. Time to target = the logged `time_s` (training time,
including the per-epoch evaluation, which costs every contestant the same) of the first epoch at the
target; median over seeds; `–` = not reached. Score `B = ∫₁^{tau_max:g} ρ(τ) dτ / {tau_max - 1:g}` of the
performance profile (AlgoPerf).

## Leaderboard (performance-profile scores, 1 = fastest on every problem)

{tabulate(board_rows, headers=["contestant", "B (val-acc target)", "B (train-loss target)", "note"],
          tablefmt="github")}

![performance profiles](figures/performance_profile.png)

## Time and steps to target

{_score_table(scored, targets)}

## Step time and memory (selected configurations)

Median of {preset['probe_rounds']} interleaved rounds of one training step on one batch; the
ratio to Adam is taken within the same rounds. State = tensors in `optimizer.state` (KFAC's
Kronecker factors and Hessian-free's CG vectors live outside it); peak Δ = peak memory increase of
building the run and two steps (CPU: `VmHWM − VmRSS` after `/proc/self/clear_refs`).

{_cost_table(out)}

## Selected configurations

{tabulate(sel, headers=["problem", "contestant", "trial", "options"], tablefmt="github")}

## Missing contestants and problems

{tabulate(missing, headers=["name", "why"], tablefmt="github") if missing else "None."}

## Diverged runs

A run whose loss or update became non-finite stops there (its rows up to then count; it never wins
a tuning selection).

{tabulate(diverged, headers=["run", "why"], tablefmt="github") if diverged else "None."}

## Curves

""" + "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs[1:]) + "\n" + failures_section(out)
    return write_report(out, text)
