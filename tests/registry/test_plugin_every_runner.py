"""Issue #7's acceptance, as a new user would check it: a third-party plugin the project has never
seen (the repo's toy plugin, ``pip install``-ed for real into a target directory) reaches every
runner by its registry names, in fresh interpreters.

The toy plugin registers ``toy.tiny_mlp`` (model factory ``(*, in_features, num_classes,
hidden)``), ``toy.sign_sgd`` (torch.optim style) and ``toy.param_norm`` (a run metric returning
``{"norm", "drift"}``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from realdata import REAL_MNIST, needs_real_mnist
from toy_plugin import pip_install

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory) -> dict:
    """The toy plugin pip-installed into a target directory on PYTHONPATH, a private solver
    cache, and the real MNIST location."""
    root = tmp_path_factory.mktemp("toy")
    target = pip_install(root)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GNREV_CACHE_DIR"] = str(root / "cache")
    env["GNREV_DATA_DIR"] = str(REAL_MNIST)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(env: dict, *args: str, cwd: Path | None = None, timeout: int = 300
         ) -> subprocess.CompletedProcess:
    exe = BIN / args[0]
    proc = subprocess.run([str(exe) if exe.exists() else args[0], *args[1:]], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_gnrev_list_shows_the_plugins_three_entries(toy_env):
    out = _run(toy_env, "gnrev", "list").stdout
    for kind, name in (("model", "toy.tiny_mlp"), ("optimizer", "toy.sign_sgd"),
                       ("metric", "toy.param_norm")):
        [line] = [ln for ln in out.splitlines() if name in ln.split()]
        assert kind in line and "gnrev-toy-plugin 0.3.1" in line


@needs_real_mnist
def test_train_runs_the_plugins_model_optimizer_and_metric(toy_env, tmp_path):
    out = tmp_path / "toy"
    _run(toy_env, "gnrev", "train", "--model", "toy.tiny_mlp", "--optimizer", "toy.sign_sgd",
         "--opt", "lr=1e-3", "--metric", "toy.param_norm", "--data", "mnist", "--train-size",
         "512", "--epochs", "1", "--out", str(out), "--no-progress")
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["test_acc"] <= 1
        assert r["toy.param_norm.norm"] > 0 and math.isfinite(r["toy.param_norm.drift"])
    assert rows[0]["toy.param_norm.drift"] == 0.0 < rows[1]["toy.param_norm.drift"]
    spec = json.loads((out / "config.json").read_text())["spec"]
    assert (spec["model"], spec["optimizer"], spec["metrics"]) == (
        "toy.tiny_mlp", "toy.sign_sgd", ["toy.param_norm"])
    assert spec["optimizer_kwargs"] == {"lr": 1e-3} and spec["model_kwargs"] == {"hidden": 8}


@needs_real_mnist
def test_dense_gn_trains_a_model_gnrev_has_never_seen(toy_env, tmp_path):
    out = tmp_path / "dense"
    _run(toy_env, "gnrev", "train", "--model", "toy.tiny_mlp", "--model-opt", "hidden=32",
         "--optimizer", "dense_gn", "--data", "mnist", "--train-size", "256", "--batch-size",
         "64", "--epochs", "1", "--out", str(out), "--no-progress")
    rows = _rows(out)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    # nC = 640 rows of J, P = 25,450 and 32 ≥ C hidden units: J has full row rank, every GN
    # step is exact (with hidden=8 < C each sample's C rows span only 8 directions)
    assert rows[1]["exact_frac"] == 1.0


def test_benchopt_and_the_leaderboard_name_the_plugins_optimizer(toy_env, tmp_path):
    bench = tmp_path / "B"
    _run(toy_env, "gnrev", "benchopt", "init", str(bench))
    assert (bench / "solvers" / "toy_sign_sgd.py").is_file()
    _run(toy_env, "benchopt", "run", str(bench), "-s", "toy.sign_sgd", "-d", "simulated", "-n",
         "2", "-r", "1", "--no-plot", "--no-html", cwd=bench, timeout=600)
    [parquet] = list((bench / "outputs").glob("*.parquet"))
    board = _run(toy_env, "gnrev", "leaderboard", str(parquet)).stdout
    [row] = [ln for ln in board.splitlines() if "toy.sign_sgd[" in ln]
    assert "toy.sign_sgd[batch_size=128,device=cpu,lr=0.01]" in row
