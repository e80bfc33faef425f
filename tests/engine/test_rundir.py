"""Run-directory plumbing: atomic writes, torn JSONL lines, config checks on resume, plotting
helpers, reference learning rates, the per-batch loss change, and exact resume of
:func:`~gnrev_plugin.engine.runner.train_run` after a crash at each point of an epoch's
bookkeeping (in the middle of the log write, after the log row, after the checkpoint)."""

import json
import math

import numpy as np
import pytest
import torch

from gnrev_plugin.build import RunSpec, load_data
from gnrev_plugin.engine import BatchLossChange, Callback, Diagnostics, Interrupted, WallTime, rundir
from gnrev_plugin.engine.runner import train_run
from gnrev_plugin.experiments.diagnostics import RevMLPDiagnostics
from gnrev_plugin.experiments.exact_gn import reference_lr
from gnrev_plugin.experiments.plotting import mean_std_curve
from gnrev_plugin.experiments.tables import fmt, mean_std
from gnrev_plugin.stepping import StepResult


def test_atomic_write_leaves_no_temp_files_and_replaces(tmp_path):
    p = tmp_path / "a" / "r.json"
    rundir.atomic_write_json(p, {"x": 1, "t": torch.tensor([1.5, 2.0]), "bad": float("nan")})
    rundir.atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"
    rundir.atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(OSError):
        rundir.atomic_write_text(p, "new")
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["r.txt"]


def test_jsonl_skips_a_torn_last_line(tmp_path):
    p = tmp_path / "log.jsonl"
    rundir.append_jsonl(p, {"epoch": 0, "v": np.float64(1.5)})
    rundir.append_jsonl(p, {"epoch": 1, "v": math.inf})
    with open(p, "a") as fh:
        fh.write('{"epoch": 2, "v"')  # a crash in the middle of a write
    assert rundir.read_jsonl(p) == [{"epoch": 0, "v": 1.5}, {"epoch": 1, "v": None}]
    assert rundir.read_jsonl(tmp_path / "none.jsonl") == []


def test_rundir_config_resume_check_and_checkpoint(tmp_path):
    run = rundir.RunDir(tmp_path / "r")
    run.write_config({"lr": 0.1, "seed": 1}, resume=False)
    run.write_config({"lr": 0.1, "seed": 1}, resume=True)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        run.write_config({"lr": 0.2, "seed": 1}, resume=True)
    run.write_config({"lr": 0.2, "seed": 1}, resume=False)  # a fresh run may overwrite
    state = {"epoch": 3, "w": torch.arange(4.0)}
    run.save_checkpoint(state)
    back = run.load_checkpoint()
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    run.log({"epoch": 0})
    run.log({"epoch": 1})
    run.truncate_log([r for r in run.rows() if r["epoch"] < 1])
    assert run.rows() == [{"epoch": 0}]
    assert not run.done
    run.write_error("trace")
    run.write_result({"ok": True})
    assert run.done and not run.file(run.ERROR).exists()
    run.reset()
    assert not run.done and run.load_checkpoint() is None and run.rows() == []


def test_mean_std_curve_aligns_runs():
    a = [{"epoch": 0, "v": 1.0}, {"epoch": 1, "v": 3.0}]
    b = [{"epoch": 0, "v": 3.0}, {"epoch": 1, "v": None}]
    xs, m, s, n = mean_std_curve([a, b], "v")
    assert n == 2 and xs.tolist() == [0, 1]
    assert m.tolist() == [2.0, 3.0] and s.tolist() == [1.0, 0.0]


def test_mean_std_and_fmt():
    assert mean_std([1.0, 3.0, None, float("nan")]) == (2.0, 1.0, 2)
    assert fmt(0.5, 0.01, 3, pct=True) == "50 ± 1%"
    assert fmt(float("nan")) == "–"


def test_reference_lrs_in_the_function_space_convention():
    assert reference_lr("exact_gn", "full_batch", 2) == 1.0  # α = L · 0.5
    assert reference_lr("gnrev.exact_gn", "mini_batch", 2) == pytest.approx(0.2)
    assert reference_lr("adam", "mini_batch", 2) == 1e-4
    assert reference_lr("sgd", "full_batch", 6) == 0.1
    with pytest.raises(ValueError, match="no learning rate"):
        reference_lr("lbfgs", "full_batch", 2)
    with pytest.raises(ValueError, match="setting"):
        reference_lr("sgd", "half_batch", 2)


def test_percentage_loss_change_sign():
    assert StepResult(2.0, 1.5, None).pct_change == pytest.approx(-25.0)
    assert StepResult(2.0, 2.2, True).pct_change == pytest.approx(10.0)


def test_paper_preset_uses_the_paper_protocol():
    from gnrev_plugin.defaults import RANK_POLICY
    from gnrev_plugin.experiments.exact_gn import exact_gn_run_specs
    from gnrev_plugin.experiments.presets import get_preset

    p = get_preset("exact-gn", "paper")
    runs = {name: (spec, extra) for name, spec, extra in exact_gn_run_specs(p, "mnist")}
    assert len(runs) == 2 * 3 * 3
    (fb, fb_extra), (mb, mb_extra) = runs["full_batch/exact_gn/seed42"], \
        runs["mini_batch/adam/seed44"]
    assert (fb.model, fb.optimizer, mb.optimizer) == ("gnrev.revmlp", "gnrev.exact_gn",
                                                       "gnrev.adam")
    assert (fb.model_kwargs["hidden"], fb.model_kwargs["num_blocks"], fb.batch_size,
            fb.epochs) == (8000, 2, 1024, 100)
    assert fb.model_kwargs["linear_first_block"] and fb.loss == "cross_entropy"
    assert fb.optimizer_kwargs == {"lr": 1.0, "rank_policy": RANK_POLICY}  # α = L · 0.5
    assert (mb.batch_size, mb.epochs, mb.optimizer_kwargs["lr"]) == (1024, 100, 1e-4)
    assert (fb_extra, mb_extra) == ({"setting": "full_batch", "lr_from": "reference"},
                                    {"setting": "mini_batch", "lr_from": "reference"})
    assert fb.seed == 42 and mb.seed == 44 and fb.device == "cpu"
    assert p["full_batch"]["subset"] == 1024 and p["mini_batch"]["train_size"] is None
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("exact-gn", "huge")



def test_exact_gn_runs_any_registered_optimizer_by_name():
    """An optimizer outside the paper's three runs at its registered default lr and is named by
    its registry name; a preset lr overrides; an unknown name fails before any work, listing the
    registered optimizers."""
    from gnrev_plugin.defaults import OPTIMIZER_DEFAULTS
    from gnrev_plugin.experiments.exact_gn import exact_gn_run_specs
    from gnrev_plugin.experiments.presets import get_preset
    from gnrev_plugin.registry import UnknownNameError

    p = dict(get_preset("exact-gn", "smoke"), optimizers=["gnrev.dense_gn", "sgd"],
             lr={"mini_batch": {"sgd": 0.05}})
    runs = {name: (spec, extra) for name, spec, extra in exact_gn_run_specs(p, "mnist", "cpu")}
    assert sorted(runs) == ["full_batch/dense_gn/seed0", "full_batch/sgd/seed0",
                            "mini_batch/dense_gn/seed0", "mini_batch/sgd/seed0"]
    spec, extra = runs["mini_batch/dense_gn/seed0"]
    assert spec.optimizer_kwargs == OPTIMIZER_DEFAULTS["gnrev.dense_gn"]
    assert extra["lr_from"] == "registered default"
    assert runs["mini_batch/sgd/seed0"][0].optimizer_kwargs["lr"] == 0.05
    assert runs["mini_batch/sgd/seed0"][1]["lr_from"] == "preset"
    assert runs["full_batch/sgd/seed0"][0].optimizer_kwargs["lr"] == 0.1
    with pytest.raises(UnknownNameError, match="gnrev.exact_gn"):
        exact_gn_run_specs(dict(p, optimizers=["lbfgs"]), "mnist")


def test_the_catalog_dispatches_every_experiment_of_the_command_line(tmp_path):
    from gnrev_plugin.experiments.catalog import EXPERIMENTS, build_report
    from gnrev_plugin.experiments.presets import EXPERIMENT_NAMES

    assert tuple(EXPERIMENTS) == EXPERIMENT_NAMES
    rundir.RunDir(tmp_path).write_config({"experiment": "no-such-paper"}, resume=False)
    with pytest.raises(ValueError, match="unknown experiment .no-such-paper.; known: exact-gn"):
        build_report(tmp_path)

# ------------------------------------------------------------------ crash injection and resume
CRASH_EPOCH = 2
CRASH_POINTS = ("mid_log_write", "after_log", "after_checkpoint")


def _resume_problem():
    """A tiny, file-free run with every kind of state a resume must restore: Adam's moments, the
    NTK-velocity diagnostic's previous kernel, a run metric against the initial model."""
    ds = load_data("teacher_student", dict(n_train=48, n_test=32, in_features=8, num_classes=4,
                                           teacher_hidden=16, seed=3), input_multiple=2)
    spec = RunSpec(model="revmlp", model_kwargs=dict(hidden=16, num_blocks=2),
                   optimizer="adam", optimizer_kwargs=dict(lr=0.02), dataset="teacher_student",
                   metrics=["weight_cosine_to_init"], seed=5, epochs=4, batch_size=16,
                   probe_size=8)
    return ds, spec


def _train(path, resume=False, kill=()):
    ds, spec = _resume_problem()
    callbacks = [BatchLossChange(), Diagnostics(RevMLPDiagnostics.factory(8)), WallTime(), *kill]
    return train_run(spec, ds, rundir.RunDir(path), callbacks, resume=resume, progress=False)


def _log_without_times(path):
    return [{k: v for k, v in r.items() if k != "time_s"}
            for r in rundir.read_jsonl(path / rundir.RunDir.LOG)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "full"
    _train(path)
    return path


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_then_resume_logs_exactly_what_an_uninterrupted_run_logs(point, uninterrupted,
                                                                         tmp_path, monkeypatch):
    """Kill the run at epoch 2 (a torn half-written log row; a complete row but no checkpoint;
    row and checkpoint written), resume, and compare every logged value but ``time_s`` and the
    final weights with the uninterrupted run."""
    out = tmp_path / "cut"

    class Crash(Callback):
        def on_row_logged(self, state, row):
            if point == "after_log" and row["epoch"] == CRASH_EPOCH:
                raise Interrupted(f"killed {point}")

        def on_checkpoint(self, state, row):
            if point == "after_checkpoint" and row["epoch"] == CRASH_EPOCH:
                raise Interrupted(f"killed {point}")

    if point == "mid_log_write":
        real_log = rundir.RunDir.log

        def torn_log(self, row, name=None):
            if row.get("epoch") == CRASH_EPOCH:
                with open(self.file(name or self.LOG), "a") as fh:
                    fh.write('{"epoch": 2, "train_lo')             # the write is cut short
                raise Interrupted("killed mid-write")
            return real_log(self, row, name)
        monkeypatch.setattr(rundir.RunDir, "log", torn_log)
    with pytest.raises(Interrupted):
        _train(out, kill=[Crash()])
    monkeypatch.undo()

    # the crash left the state it simulates
    ckpt = rundir.RunDir(out).load_checkpoint()
    logged = [r["epoch"] for r in rundir.read_jsonl(out / rundir.RunDir.LOG)]
    assert ckpt["epoch"] == (CRASH_EPOCH if point == "after_checkpoint" else CRASH_EPOCH - 1)
    assert logged == list(range(CRASH_EPOCH + (point != "mid_log_write")))
    assert not rundir.RunDir(out).done

    result = _train(out, resume=True)
    assert _log_without_times(out) == _log_without_times(uninterrupted)
    lines = (out / rundir.RunDir.LOG).read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)   # no torn row left
    final, ref = rundir.RunDir(out).load_checkpoint(), rundir.RunDir(uninterrupted).load_checkpoint()
    assert final["epoch"] == ref["epoch"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(final["model"][k], v), k
    assert {k: v for k, v in result["final"].items() if k != "time_s"} == \
        _log_without_times(uninterrupted)[-1]
