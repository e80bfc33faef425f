"""The engine's epoch loop: rows every k epochs, callbacks every k epochs, divergence handled by
a callback or raised, a diverged run that stays stopped on resume, and one loop in the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gnrev_plugin
from gnrev_plugin.build import RunSpec, load_data
from gnrev_plugin.engine import Callback, EpochPlan, RunDir, StopOnDivergence, train_run
from gnrev_plugin.engine.rundir import read_jsonl


def _problem(lr: float = 0.05, epochs: int = 5):
    ds = load_data("teacher_student", dict(n_train=24, n_test=8, in_features=4, num_classes=3,
                                           teacher_hidden=8, seed=1))
    spec = RunSpec(model="mlp", model_kwargs=dict(hidden=[6], dtype="float64"), optimizer="sgd",
                   optimizer_kwargs=dict(lr=lr), dataset="teacher_student", seed=2,
                   epochs=epochs, batch_size=8, probe_size=8)
    return ds, spec


class Count(Callback):
    """Records the epochs it measured (every 2 epochs)."""

    every = 2

    def __init__(self) -> None:
        self.measured: list[int] = []

    def measure(self, state, epoch, row):
        self.measured.append(epoch)
        return {"count": len(self.measured)}


def test_rows_every_k_epochs_and_callbacks_every_k(tmp_path):
    ds, spec = _problem(epochs=7)
    every2 = Count()
    train_run(spec, ds, RunDir(tmp_path / "r3"), [every2], EpochPlan(every=3), progress=False)
    rows = read_jsonl(tmp_path / "r3" / "log.jsonl")
    assert [r["epoch"] for r in rows] == [0, 3, 6, 7]           # rows: 0, every 3rd, the last
    assert every2.measured == [0, 6, 7]                 # due and logged: 0, 6, the last; not 3
    assert "count" not in rows[1] and rows[2]["count"] == 2 and rows[3]["count"] == 3

    every2 = Count()
    train_run(spec, ds, RunDir(tmp_path / "r1"), [every2], progress=False)
    assert every2.measured == [0, 2, 4, 6, 7]                    # every 2nd and the last


def test_a_divergence_fails_the_run_without_a_handler(tmp_path):
    ds, spec = _problem(lr=1e200)
    with pytest.raises(FloatingPointError, match="non-finite loss after a step at epoch 1"):
        train_run(spec, ds, RunDir(tmp_path), progress=False)
    assert not RunDir(tmp_path).done


def test_stop_on_divergence_logs_a_last_row_and_stays_stopped_on_resume(tmp_path):
    ds, spec = _problem(lr=1e200)
    plan = EpochPlan(every=2, reevaluate=False)
    result = train_run(spec, ds, RunDir(tmp_path), [StopOnDivergence()], plan, progress=False)
    rows = read_jsonl(tmp_path / "log.jsonl")
    # epoch 1 is not due (every 2) but gets the row of the divergence, and the run ends there
    assert [(r["epoch"], r["diverged"]) for r in rows] == [(0, False), (1, True)]
    assert result["diverged"] == "non-finite training loss"
    assert RunDir(tmp_path).load_checkpoint()["stop_reason"] == result["diverged"]

    (tmp_path / "result.json").unlink()          # as if killed after the last checkpoint
    again = train_run(spec, ds, RunDir(tmp_path), [StopOnDivergence()], plan, resume=True,
                      progress=False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "log.jsonl")] == [0, 1]
    assert again["diverged"] == result["diverged"]


def test_the_package_has_one_epoch_loop():
    """Every gnrev runner trains through :func:`gnrev_plugin.engine.loop.run_epochs` (bug: a
    private copy of the epoch loop in an experiment). The DeepOBS adapter's runner is DeepOBS's
    own loop (its ``PTRunner.training`` contract over the test problem's batch iterators, with
    DeepOBS's abort-and-pad rule), so it is the one other loop."""
    root = Path(gnrev_plugin.__file__).parent
    loops = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py"))
             for line in p.read_text().splitlines() if re.match(r"\s*for epoch in range", line)]
    assert loops == ["engine/loop.py", "hosts/deepobs/runner.py"]
