"""Run provenance (``gnrev_plugin.engine.provenance``): every run records what made its numbers
(package version, git commit, library versions, threads, device, determinism), one row per
session; committed records carry no absolute path of the machine; ``--deterministic``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy
import torch
from realdata import REAL_MNIST, needs_real_mnist

import gnrev_plugin
from gnrev_plugin.build import RunSpec, load_data
from gnrev_plugin.cli import main
from gnrev_plugin.engine import RunDir, train_run
from gnrev_plugin.engine.provenance import PROVENANCE_LOG, git_commit
from gnrev_plugin.engine.rundir import read_jsonl

CHECKOUT = Path(gnrev_plugin.__file__).resolve().parents[1]


def _problem(epochs: int = 2):
    ds = load_data("teacher_student", dict(n_train=16, n_test=8, in_features=4, num_classes=3,
                                           teacher_hidden=8, seed=1))
    spec = RunSpec(model="mlp", model_kwargs=dict(hidden=[5]), optimizer="sgd",
                   optimizer_kwargs=dict(lr=0.05), dataset="teacher_student", seed=2,
                   epochs=epochs, batch_size=8, probe_size=8)
    return ds, spec


def test_a_run_records_versions_commit_threads_and_device(tmp_path):
    """Bug: train_run without the provenance call (no file) or with wrong values."""
    ds, spec = _problem()
    train_run(spec, ds, RunDir(tmp_path), progress=False)
    (row,) = read_jsonl(tmp_path / PROVENANCE_LOG)
    assert row["package_version"] == gnrev_plugin.__version__
    assert row["torch"] == torch.__version__ and row["numpy"] == numpy.__version__
    assert row["curvlinops"] != "not installed"
    assert row["threads"] == torch.get_num_threads() and row["device"] == "cpu"
    assert row["deterministic"] is False
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True,
                          text=True)
    if head.returncode == 0:   # a git checkout (CI clones one); else "unknown" below
        assert row["git_commit"].removesuffix("+dirty") == head.stdout.strip()


def test_git_commit_is_unknown_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_one_row_per_session_and_a_fresh_run_starts_over(tmp_path):
    """A resumed run appends a row; a new run in the same folder drops the old rows (bug: the
    rows of an unrelated earlier run kept)."""
    ds, spec = _problem(epochs=1)
    train_run(spec, ds, RunDir(tmp_path), progress=False)
    longer = RunSpec.from_dict({**spec.to_dict(), "epochs": 2})
    train_run(longer, ds, RunDir(tmp_path / "b"), progress=False)
    assert len(read_jsonl(tmp_path / PROVENANCE_LOG)) == 1
    train_run(spec, ds, RunDir(tmp_path), progress=False)
    assert len(read_jsonl(tmp_path / PROVENANCE_LOG)) == 1


@needs_real_mnist
def test_records_carry_no_absolute_path_of_the_machine(tmp_path):
    """The MNIST source is recorded as folder name + checksum (bug: ``str(data_dir)``)."""
    rc = main(["train", "--optimizer", "sgd", "--data", "mnist", "--data-dir", str(REAL_MNIST),
               "--train-size", "32", "--model", "mlp", "--model-opt", "hidden=[4]",
               "--epochs", "1", "--batch-size", "16", "--no-progress", "--deterministic",
               "--out", str(tmp_path / "run")])
    try:
        assert rc == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    # the spec keeps the --data-dir the user typed (an input); what the run records does not
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    text = json.dumps(cfg["data_info"]) + (tmp_path / "run" / PROVENANCE_LOG).read_text()
    assert str(REAL_MNIST) not in text and str(REAL_MNIST.parent) not in text
    assert cfg["data_info"]["source"].startswith(f"{REAL_MNIST.name} (sha256 ")
    (row,) = read_jsonl(tmp_path / "run" / PROVENANCE_LOG)
    assert row["deterministic"] is True
