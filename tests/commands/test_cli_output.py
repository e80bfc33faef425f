"""What the CLI prints: a warning per epoch of inexact Gauss-Newton steps, epoch lines above the
progress bar (never glued onto it), and ``gnrev list`` within the terminal's width (issue 22,
item 5)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gnrev_plugin.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--optimizer", "exact_gn", "--data", "teacher-student", "--epochs", "2",
         "--no-progress"]


def test_inexact_gauss_newton_steps_are_reported_each_epoch(tmp_path, capsys):
    """Batch 64 > width + 1 = 17: every step is a least-squares step. Today: no warning at all
    (planted: the callback left out of the command -> this test fails)."""
    assert main([*TRAIN, "--model-opt", "hidden=16", "--batch-size", "64",
                 "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: epoch")]
    assert len(lines) == 2                                      # one line per epoch
    assert "epoch 1: 8 of 8 Gauss-Newton steps inexact" in lines[0]
    assert "worst relative residual" in lines[0] and "batch <=" in lines[0]
    # exact steps (batch 32 <= 65): silent
    assert main([*TRAIN, "--model-opt", "hidden=64", "--batch-size", "32",
                 "--out", str(tmp_path / "b")]) == 0
    assert "inexact" not in capsys.readouterr().err


def test_epoch_lines_are_written_above_the_progress_bar(tmp_path):
    """stdout and stderr in one stream, as in a terminal: each epoch line starts its own line
    after the bar is cleared (tqdm.write). Planted ``print`` -> the epoch-1 line follows the
    bar's text after its last carriage return."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    args = [a for a in TRAIN if a != "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "gnrev_plugin.cli", *args, "--batch-size",
                           "32", "--model-opt", "hidden=64", "--out", str(tmp_path / "run")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          timeout=300, check=True)
    epoch_lines = [line for line in proc.stdout.split("\n") if "train loss" in line]
    assert len(epoch_lines) == 3
    for line in epoch_lines:
        assert line.rsplit("\r", 1)[-1].startswith("epoch "), repr(line)
    assert "|" in proc.stdout          # the bar was drawn


@pytest.mark.parametrize("width", [80, 100, 160])
def test_list_fits_the_terminal(monkeypatch, capsys, width):
    """Today: lines of ~350 characters at any width."""
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= width
    assert "gnrev.exact_gn" in out and "gnrev.revmlp" in out


def test_list_into_a_pipe_keeps_whole_lines(monkeypatch, capsys):
    """Not a terminal (no ``COLUMNS``): nothing wrapped or left out, for scripts."""
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "gnrev.revmlp" in ln.split())
    assert "gnrev_plugin.nn:RevMLP" in line and "gnrev-plugin" in line


def test_a_diverged_run_is_one_error_line_not_a_traceback(tmp_path, capsys):
    """``--opt lr=1e30`` makes the first SGD step non-finite: the CLI says so in one line, exit
    3, and keeps the run directory (before: a ``FloatingPointError`` traceback)."""
    out = tmp_path / "run"
    code = main(["train", "--optimizer", "sgd", "--opt", "lr=1e30", "--data", "teacher-student",
                 "--epochs", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("gnrev train: error: the run diverged:") and "smaller" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    assert (out / "log.jsonl").exists()
