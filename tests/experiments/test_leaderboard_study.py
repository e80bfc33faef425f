"""``gnrev reproduce leaderboard``: scoring against hand-computed values, the seeded search, and the
smoke preset end to end (CPU time ≤ 60 s, report rebuilt from the logs alone, rows merged into an
existing table by ``gnrev leaderboard --merge``)."""

from __future__ import annotations

import math
import resource
import shutil

import pytest
import rivals_site

from gnrev_plugin.cli import main
from gnrev_plugin.experiments.leaderboard_study.presets import (
    CONTESTANTS,
    LEADERBOARD_PRESETS,
    SEARCH_SPACES,
)
from gnrev_plugin.experiments.leaderboard_study.run import sample_trials
from gnrev_plugin.experiments.leaderboard_study.scoring import (
    problem_targets,
    profile,
    profile_score,
    time_to_targets,
)

rival_registry = rivals_site.rival_registry   # the fixture: the registry with the rivals plugin


def test_profile_score_matches_a_hand_computed_integral():
    """Ratios: a = [1, 2], b = [2, 1], c = [∞, 5]. With τ_max = 4:
    B_a = B_b = ((4 − 1) + (4 − 2)) / 3 / 2 = 5/6, B_c = 0 (5 > τ_max)."""
    times = {"p1": {"a": 1.0, "b": 2.0, "c": math.inf}, "p2": {"a": 3.0, "b": 1.5, "c": 7.5}}
    scores = profile_score(times, tau_max=4.0)
    assert scores == pytest.approx({"a": 5 / 6, "b": 5 / 6, "c": 0.0}, abs=1e-12)
    rho = profile(times, [1.0, 1.99, 2.0, 5.0])
    assert rho["a"] == [0.5, 0.5, 1.0, 1.0] and rho["c"] == [0.0, 0.0, 0.0, 0.5]


def test_targets_and_time_to_target_from_rows():
    def run(accs, losses):
        return [dict(epoch=i, steps=10 * i, time_s=1.5 * i, test_acc=a, train_loss=ls)
                for i, (a, ls) in enumerate(zip(accs, losses, strict=True))]
    final = {"fast": [run([0.1, 0.8, 0.9], [2.0, 0.5, 0.4])],
             "slow": [run([0.1, 0.5, 0.85], [2.0, 1.0, 0.8])]}
    targets = problem_targets(final, target_fraction=0.9, loss_target_factor=2.0)
    assert targets == pytest.approx({"val_acc": 0.81, "train_loss": 0.8})
    fast, slow = (time_to_targets(final[c], targets) for c in ("fast", "slow"))
    assert fast["val_acc_time_s"] == 3.0 and fast["val_acc_steps"] == 20     # 0.9 ≥ 0.81 at epoch 2
    assert fast["train_loss_time_s"] == 1.5                                   # 0.5 ≤ 0.8 at epoch 1
    assert slow["val_acc_time_s"] == 3.0 and slow["train_loss_steps"] == 20
    assert time_to_targets([run([0.1], [3.0])], targets)["val_acc_time_s"] == math.inf


def test_search_is_declared_seeded_and_in_range():
    assert set(SEARCH_SPACES) == set(CONTESTANTS)
    assert all("lr" in space and len(space) <= 3 for space in SEARCH_SPACES.values())
    for c, space in SEARCH_SPACES.items():
        trials = sample_trials(c, "p", 6, seed=0)
        assert trials[0] == {} and trials == sample_trials(c, "p", 6, seed=0)
        assert trials != sample_trials(c, "p", 6, seed=1)
        for t in trials[1:]:
            for key, (kind, *args) in space.items():
                assert (args[0] <= t[key] <= args[1]) if kind == "log" else t[key] in args[0]


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@pytest.mark.slow
def test_smoke_preset_end_to_end(rival_registry, tmp_path, capsys):
    out = tmp_path / "study"
    cpu0 = _cpu_seconds()
    rc = main(["reproduce", "leaderboard", "--preset", "smoke", "--out", str(out), "--no-progress"])
    cpu = _cpu_seconds() - cpu0
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert cpu <= 60, f"the smoke preset took {cpu:.0f} s of CPU (goal ≤ 60 s in CI)"
    report = (out / "report.md").read_text()
    preset = LEADERBOARD_PRESETS["smoke"]
    for c in preset["contestants"]:
        assert f"| {c} " in report, c                       # every contestant is on the board
        for p in preset["problems"]:
            assert (out / "tuning" / p / c / "trial0" / "log.jsonl").exists()
    assert "Missing contestants and problems" in report and "deepobs_mnist_2c2d" in report
    assert (out / "figures" / "performance_profile.png").exists()
    # rebuilt from the logs alone
    saved = report
    (out / "report.md").unlink()
    shutil.rmtree(out / "figures")
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == saved
    assert (out / "figures" / "performance_profile.png").exists()
    # merged into an existing table
    table = tmp_path / "board.md"
    table.write_text("# Board\n\n| problem | optimizer | best_test_acc |\n|---|---|---|\n| x | y | 0.5 |\n")
    assert main(["leaderboard", str(out / "final"), "--merge", str(table), "--rows", "all",
                 "--out", str(tmp_path / "merged.md")]) == 0
    merged = (tmp_path / "merged.md").read_text()
    assert merged.startswith(table.read_text())                      # the old table is untouched
    assert "gnrev.hessian_free" in merged and "pytorch_optimizer.soap" in merged and "| x | y |" in merged
