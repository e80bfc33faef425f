"""``gnrev train`` and the Python API under ``torchrun`` with two "nodes" on the loopback address.

Two ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0/1`` invocations meet at one c10d
rendezvous on ``127.0.0.1`` (``--local-addr 127.0.0.1``, ``GLOO_SOCKET_IFNAME=lo``: nothing
leaves the machine), exactly as two machines of a cluster would; each process finds torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joins
its process group (:func:`gnrev_plugin.engine.launch.join_launcher_group`) and trains on its
contiguous half of every batch, the Gauss-Newton step being that of the whole batch. The
per-epoch log must equal a single process's. The run is float32: the two halves' forward passes
round differently from the whole batch's, so losses agree to ``1e-6`` relative, accuracies and
exact-step fractions exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from gnrev_plugin.cli import main
from gnrev_plugin.engine.launch import launcher_env
from gnrev_plugin.engine.rundir import read_jsonl

TRAIN = ["train", "--data", "teacher_student", "--data-opt", "n_train=96", "--data-opt",
         "n_test=64", "--data-opt", "in_features=16", "--epochs", "2", "--batch-size", "32",
         "--model-opt", "hidden=48", "--no-progress"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(cmd: list[str], timeout: float = 600.0) -> list[subprocess.CompletedProcess]:
    """Run ``cmd`` (a module and its arguments) as torchrun node 0 and node 1 at once."""
    port, run_id = _free_port(), f"gnrev-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", run_id, "--local-addr", "127.0.0.1",
         "--max-restarts", "0", *cmd], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, r in enumerate(out):
        assert r.returncode == 0, f"node {node} failed:\n{r.stdout[-4000:]}"
    return out


def _same_log(one: list[dict], two: list[dict]) -> None:
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == [0, 1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert set(a) == set(b)
        for key in ("train_acc", "test_acc", "exact_frac", "steps"):
            assert b.get(key) == a.get(key), key


def test_gnrev_train_on_two_torchrun_nodes_logs_the_one_process_run(tmp_path):
    assert main([*TRAIN, "--out", str(tmp_path / "one")]) == 0
    out = _two_nodes(["-m", "gnrev_plugin.cli", *TRAIN, "--out", str(tmp_path / "two")])
    _same_log(read_jsonl(tmp_path / "one" / "log.jsonl"),
              read_jsonl(tmp_path / "two" / "log.jsonl"))
    assert read_jsonl(tmp_path / "two" / "log.jsonl")[-1]["exact_frac"] is not None
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["nproc"] == 2                     # the two processes formed one group
    printed = [r.stdout.count("epoch   2") for r in out]
    assert sorted(printed) == [0, 1]                 # only rank 0 prints its epochs


API_SCRIPT = textwrap.dedent("""
    import sys
    from gnrev_plugin.build import RunSpec, load_data
    from gnrev_plugin.engine import RunDir, train_run
    from gnrev_plugin.registry import get_registry

    reg = get_registry()
    spec = RunSpec(model="gnrev.revmlp", model_kwargs={"hidden": 48},
                   optimizer="gnrev.exact_gn", dataset="gnrev.teacher_student",
                   dataset_kwargs={"n_train": 96, "n_test": 64, "in_features": 16},
                   epochs=2, batch_size=32).resolve(reg)
    ds = load_data(spec.dataset, spec.dataset_kwargs, registry=reg)
    train_run(spec, ds, RunDir(sys.argv[1]), progress=False, registry=reg)
    import os, torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    with open(sys.argv[1] + f".rank{os.environ.get('RANK', '0')}", "w") as fh:
        fh.write(str(world))
""")


def test_python_api_on_two_torchrun_nodes_equals_one_process(tmp_path):
    script = tmp_path / "api_run.py"
    script.write_text(API_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                       filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
    _two_nodes([str(script), str(tmp_path / "two")])
    assert [(tmp_path / f"two.rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    _same_log(read_jsonl(tmp_path / "one" / "log.jsonl"),
              read_jsonl(tmp_path / "two" / "log.jsonl"))


def test_launcher_env_is_read_only_when_complete(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launcher_env() is None                   # no rendezvous address: not a launcher
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert launcher_env() == dict(rank=1, world=2, local_rank=0, local_world=1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher_env() is None                   # one process: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside WORLD_SIZE=2"):
        launcher_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="must be integers"):
        launcher_env()


def test_nproc_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert main([*TRAIN, "--nproc", "2"]) == 2
    assert "under torchrun" in capsys.readouterr().err
