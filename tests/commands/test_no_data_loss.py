"""No command deletes or overwrites a run's results without ``--overwrite``, and a refused
resume names the fields that differ (issue 22, item 2)."""

import pytest

from gnrev_plugin.cli import main
from gnrev_plugin.engine.rundir import config_diff, read_jsonl

ARGS = ["train", "--optimizer", "sgd", "--data", "teacher-student", "--epochs", "1",
        "--batch-size", "64", "--model-opt", "hidden=16", "--no-progress"]


@pytest.mark.parametrize("finished", [True, False])
def test_train_refuses_to_replace_an_existing_run(tmp_path, capsys, finished):
    """Today: the second ``gnrev train --out DIR`` silently deletes the log, checkpoint and
    result of the first and exits 0."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run)]) == 0
    if not finished:
        (run / "result.json").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main([*ARGS, "--out", str(run), "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before     # nothing touched
    assert main([*ARGS, "--out", str(run), "--seed", "7", "--overwrite"]) == 0
    assert (run / "result.json").exists() and len(read_jsonl(run / "log.jsonl")) == 2


def test_train_nproc_refuses_to_replace_an_existing_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*ARGS, "--optimizer", "exact_gn", "--out", str(run)]) == 0
    before = (run / "log.jsonl").read_bytes()
    assert main([*ARGS, "--optimizer", "exact_gn", "--out", str(run), "--nproc", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "log.jsonl").read_bytes() == before


def test_reproduce_refuses_a_non_empty_out(tmp_path, capsys):
    """Today: ``gnrev reproduce`` starts and replaces the runs already in ``--out``."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["reproduce", "exact-gn", "--preset", "smoke", "--out", str(out),
                 "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_refused_resume_names_the_fields_that_differ(tmp_path, capsys):
    """Today: ``its config.json differs in ['spec']``, not which option."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run)]) == 0
    (run / "result.json").unlink()
    assert main([*ARGS, "--out", str(run), "--resume", "--opt", "lr=0.5", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "spec.optimizer_kwargs.lr: 0.1 -> 0.5" in err and "spec.seed: 42 -> 3" in err
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: (absent) -> 2"]
