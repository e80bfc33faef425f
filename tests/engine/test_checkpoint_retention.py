"""A run keeps one checkpoint (the last), not one per epoch; ``--keep-checkpoints-every K``
also keeps every K-th epoch's, and each kept one resumes the run (issue 22, item 7)."""

import torch

from gnrev_plugin.cli import main
from gnrev_plugin.engine.rundir import load_tensor_file

ARGS = ["train", "--optimizer", "sgd", "--data", "teacher-student", "--epochs", "5",
        "--batch-size", "128", "--model-opt", "hidden=16", "--no-progress"]


def _pt(run):
    return sorted(p.name for p in run.glob("*.pt"))


def test_a_run_keeps_only_its_last_checkpoint_by_default(tmp_path):
    """Planted: a per-epoch copy in ``save_checkpoint`` -> 6 files."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run)]) == 0
    assert _pt(run) == ["checkpoint.pt"]
    assert load_tensor_file(run / "checkpoint.pt", ["epoch"])["epoch"] == 5


def test_keep_checkpoints_every_k(tmp_path):
    """Today: ``--keep-checkpoints-every`` does not exist (exit 2)."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run), "--keep-checkpoints-every", "2"]) == 0
    assert _pt(run) == ["checkpoint-epoch0000.pt", "checkpoint-epoch0002.pt",
                        "checkpoint-epoch0004.pt", "checkpoint.pt"]
    kept = load_tensor_file(run / "checkpoint-epoch0002.pt", ["epoch", "model"])
    last = load_tensor_file(run / "checkpoint.pt", ["epoch", "model"])
    assert kept["epoch"] == 2 and last["epoch"] == 5
    assert any(not torch.equal(kept["model"][k], last["model"][k]) for k in last["model"])
    # --overwrite removes the kept checkpoints of the replaced run too
    assert main([*ARGS, "--out", str(run), "--overwrite", "--epochs", "1"]) == 0
    assert _pt(run) == ["checkpoint.pt"]
