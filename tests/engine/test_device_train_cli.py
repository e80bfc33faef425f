"""Devices: ``gnrev train --device cuda`` on a GPU (``@pytest.mark.cuda``)."""

from __future__ import annotations

import json
import math

import pytest


# ============================================================================ CLI on CUDA
@pytest.mark.cuda
def test_train_cli_on_cuda(tmp_path):
    """``gnrev train --device cuda`` records the device and ends near the CPU run's loss."""
    from gnrev_plugin.cli import main
    from gnrev_plugin.engine.rundir import read_jsonl

    args = ["train", "--data", "teacher-student", "--epochs", "2", "--batch-size", "32",
            "--model-opt", "hidden=64", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*args, "--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 0
    assert json.loads((tmp_path / "cuda" / "config.json").read_text())["spec"]["device"] == "cuda"
    cpu, gpu = read_jsonl(tmp_path / "cpu" / "log.jsonl"), read_jsonl(tmp_path / "cuda" /
                                                                       "log.jsonl")
    assert len(cpu) == len(gpu)
    assert math.isclose(gpu[-1]["train_loss"], cpu[-1]["train_loss"], rel_tol=1e-3)
