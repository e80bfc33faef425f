"""Files a user may receive (checkpoints, ``config.json``, ``result.json``) are read safely: a
pickle that would run code is refused before it runs, and a corrupt, truncated, foreign or
incomplete file is a clear error naming the file and the remedy (issue 22, item 1)."""

import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

from gnrev_plugin.cli import main
from gnrev_plugin.engine import RunDir
from gnrev_plugin.engine.rundir import RunFileError, load_tensor_file

ARGS = ["train", "--optimizer", "sgd", "--data", "teacher-student", "--epochs", "1",
        "--batch-size", "32", "--model-opt", "hidden=16", "--no-progress"]


class _Payload:
    """Unpickling it calls ``os.system`` (writes ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _unfinished_run(tmp_path, *extra):
    """A run directory as a crash after epoch 1 leaves it (no ``result.json``)."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run), *extra]) == 0
    (run / "result.json").unlink()
    return run


def _malicious_checkpoint(path, marker):
    buf = io.BytesIO()
    torch.save({"epoch": 0, "model": _Payload(marker), "optimizer": {}}, buf)
    path.write_bytes(buf.getvalue())


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    """Planted ``weights_only=False`` in ``load_tensor_file``: the marker is created."""
    run = _unfinished_run(tmp_path)
    marker = tmp_path / "pwned"
    _malicious_checkpoint(run / "checkpoint.pt", marker)
    assert main([*ARGS, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(run / "checkpoint.pt") in err and "weights_only=False" in err
    # the crafted file really executes under a plain unpickler (the test is not vacuous)
    subprocess.run([sys.executable, "-c", "import torch,sys; torch.load(sys.argv[1], "
                    "weights_only=False)", str(run / "checkpoint.pt")], check=False,
                   capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04truncated zip",
                                     pickle.dumps([1, 2, 3])])
def test_a_corrupt_or_foreign_checkpoint_names_the_file_and_the_remedy(tmp_path, capsys, content):
    """Today: a bare UnpicklingError/EOFError/RuntimeError traceback, or ``error: 'model'``."""
    run = _unfinished_run(tmp_path)
    (run / "checkpoint.pt").write_bytes(content)
    assert main([*ARGS, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pt") in err and "delete it" in err


def test_a_checkpoint_missing_a_key_is_not_reported_as_a_bare_key(tmp_path, capsys):
    """Today: ``gnrev train: error: 'model'``."""
    run = _unfinished_run(tmp_path)
    torch.save({"epoch": 0}, run / "checkpoint.pt")
    assert main([*ARGS, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: 'model'" not in err
    assert "lacks the entries ['model', 'optimizer']" in err and str(run / "checkpoint.pt") in err


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, capsys):
    run, other = _unfinished_run(tmp_path), tmp_path / "other"
    assert main([*ARGS, "--out", str(other), "--model-opt", "hidden=8"]) == 0
    (run / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    assert main([*ARGS, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run's model" in err and str(run / "checkpoint.pt") in err


@pytest.mark.parametrize("name", ["config.json", "result.json"])
def test_a_truncated_json_file_names_the_file(tmp_path, capsys, name):
    """Today: a bare ``JSONDecodeError`` traceback without the file's name."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run)]) == 0
    text = (run / name).read_text()
    (run / name).write_text(text[: len(text) // 2])
    assert main([*ARGS, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(run / name) in err and "not a valid JSON file" in err


def test_real_checkpoints_load_with_weights_only(tmp_path):
    """Every checkpoint the engine writes (model, optimizer and callback states) loads with
    ``weights_only=True`` and no extra safe globals."""
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run), "--optimizer", "exact_gn"]) == 0
    ckpt = load_tensor_file(run / "checkpoint.pt", ["epoch", "model", "optimizer"])
    assert ckpt["epoch"] == 1
    assert RunDir(run).load_checkpoint() is not None
    with pytest.raises(RunFileError, match="lacks the entries"):
        load_tensor_file(run / "checkpoint.pt", ["nonexistent"])
