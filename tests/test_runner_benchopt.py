"""benchopt runner: the shipped benchmark runs for real (``benchopt run``, ``benchopt test``), the
solver classes do what they claim, and GN joins a foreign benchmark through ``-s PATH``.
(The files and CLI checks that need no benchopt are in ``test_runner_benchopt_files.py``.)"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gnrev_plugin.hosts.benchopt import init_benchmark, solver_path

benchopt = pytest.importorskip(
    "benchopt", reason="benchopt is not installed (pip install 'gnrev-plugin[benchopt]')")
pd = pytest.importorskip("pandas", reason="reading benchopt results needs pandas")
pytest.importorskip("pyarrow", reason="benchopt parquet results need pyarrow")

from gnrev_plugin.hosts.benchopt import solvers as bo_solvers  # noqa: E402
from gnrev_plugin.hosts.benchopt.problem import (  # noqa: E402
    build_model,
    evaluate_classifier,
    percent_loss_change,
)
from gnrev_plugin.optim import ExactGN as ExactGNOptimizer  # noqa: E402

BENCHOPT_BIN = Path(sys.executable).with_name("benchopt")
TINY = ["-d", "simulated[n_train=64,n_test=32,in_features=16]", "-o", "*[hidden=48]",
        "-n", "2", "-r", "1", "--no-plot"]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _benchopt(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    exe = str(BENCHOPT_BIN) if BENCHOPT_BIN.exists() else shutil.which("benchopt")
    if exe is None:
        pytest.skip("the benchopt command is not on PATH")
    return subprocess.run([exe, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _has_dense_gn() -> bool:
    import gnrev_plugin.optim as optim

    return hasattr(optim, "DenseGN")


# ------------------------------------------------------------------ datasets and objective
def _bench_classes(tmp_path):
    from benchopt.benchmark import Benchmark

    bench = Benchmark(init_benchmark(tmp_path / "bench"))
    return bench, {d.name: d for d in bench.get_datasets()}


def test_datasets_return_tensors_or_a_skip_reason(tmp_path):
    from benchopt.utils.run_context import RunContext

    bench, datasets = _bench_classes(tmp_path)
    assert set(datasets) == {"simulated", "mnist", "mnist1d"}
    objective_cls = bench.get_benchmark_objective()
    for name, params in (("simulated", dict(n_train=40, n_test=20)),
                         ("mnist", dict(n_train=50, n_test=30)),
                         ("mnist", dict(path=str(tmp_path / "nowhere"), n_train=50, n_test=30)),
                         ("mnist1d", dict(num_samples=200))):
        ds = datasets[name].get_instance(**params)
        objective = objective_cls.get_instance(hidden=16)
        RunContext().set_run_context(objective, ds, "dummy", repetition=0, base_seed=0)
        data = ds.get_data()
        skip, reason = objective.skip(**data)
        if data.get("unavailable"):
            assert skip and reason.startswith(f"{name}:")
            if "path" in params:
                assert "nowhere" in reason and 'mnist[path=DIR]' in reason
            continue
        assert not skip
        assert data["X_train"].dtype == torch.float32 and data["y_train"].dtype == torch.long
        assert data["X_train"].shape[1] == data["X_test"].shape[1]
        if name == "mnist":
            assert data["X_train"].shape == (50, 784) and data["X_test"].shape == (30, 784)
        objective.set_data(**data)
        model = objective.get_one_result()["model"]
        out = objective.evaluate_result(model)
        assert out["value"] == out["train_loss"] and 0 <= out["test_accuracy"] <= 1
        assert math.isnan(out["batch_loss_change"])


# ------------------------------------------------------------------ solver classes, in process
class _EpochCallback:
    """Stands in for benchopt's callback: allows ``epochs`` epochs, recording each result."""

    def __init__(self, solver, epochs):
        self.solver, self.left, self.results = solver, epochs + 1, []

    def __call__(self):
        self.results.append({k: (v if k != "model" else None)
                             for k, v in self.solver.get_result().items()})
        self.left -= 1
        return self.left > 0


def _problem(seed=0, n=48, d=16, classes=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y, classes


def _solver(cls, x, y, classes, **params):
    from functools import partial

    solver = cls.get_instance(**params)
    solver.set_objective(X=x, y=y, model_init_fn=partial(build_model, "revmlp", x.shape[1],
                                                          classes, hidden=40, num_blocks=2,
                                                          seed=3, linear_first_block=False,
                                                          init_std=0.1),
                         loss="cross_entropy", track_batch_loss_change=True)
    return solver


def test_exact_gn_solver_matches_a_plain_optimizer_loop():
    """The benchopt solver's epoch is exactly the optimizer loop on the solver's batch order."""
    x, y, c = _problem()
    solver = _solver(bo_solvers.ExactGN, x, y, c, lr=0.5, batch_size=16, fast_path=True,
                     rank_policy="raise")
    cb = _EpochCallback(solver, epochs=2)
    solver.run(cb)

    torch.manual_seed(solver.seed)
    model = build_model("revmlp", x.shape[1], c, hidden=40, num_blocks=2, seed=3,
                        linear_first_block=False, init_std=0.1)
    opt = ExactGNOptimizer(model.parameters(), lr=0.5, loss="cross_entropy", model=model,
                           rank_policy="raise")
    gen = torch.Generator().manual_seed(solver.seed)
    changes = []
    for _ in range(2):
        order = torch.randperm(len(y), generator=gen)
        changes = []
        for start in range(0, len(y), 16):
            idx = order[start:start + 16]
            before = float(opt.step_on_batch(x[idx], y[idx]))
            with torch.no_grad():
                after = float(torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))
            changes.append(percent_loss_change(before, after))
    for p, q in zip(solver.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert cb.results[-1]["batch_loss_change"] == pytest.approx(sum(changes) / len(changes))
    assert cb.results[-1]["exact_step_fraction"] == 1.0
    assert math.isnan(cb.results[0]["batch_loss_change"])  # nothing trained before epoch 1


def test_exact_gn_fast_path_equals_drop_in_path():
    x, y, c = _problem(seed=1)
    models = []
    for fast in (True, False):
        solver = _solver(bo_solvers.ExactGN, x, y, c, lr=0.3, batch_size=12, fast_path=fast,
                         rank_policy="raise")
        solver.run(_EpochCallback(solver, epochs=1))
        models.append(solver.model)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_exact_gn_solver_skips_non_reversible_models():
    x, y, c = _problem()
    skip, reason = bo_solvers.ExactGN.get_instance().skip(X=x, y=y, model_kind="mlp")
    assert skip and "DenseGN" in reason
    skip, reason = bo_solvers.Adam.get_instance().skip(X=x, y=y, framework="tensorflow")
    assert skip and "PyTorch" in reason


def test_dense_gn_solver_skips_oversized_systems():
    x, y, c = _problem()
    from functools import partial

    init = partial(build_model, "mlp", x.shape[1], c, hidden=32, num_blocks=1)
    solver = bo_solvers.DenseGN.get_instance(batch_size=16, max_dense_entries=1000)
    skip, reason = solver.skip(X=x, y=y, model_init_fn=init)
    p = sum(q.numel() for q in init().parameters())
    assert skip and f"P={p}" in reason
    assert bo_solvers.DenseGN.get_instance(batch_size=16).skip(X=x, y=y, model_init_fn=init) == \
        (False, None)


def test_first_order_solvers_decrease_the_training_loss():
    x, y, c = _problem(seed=2)
    for cls, lr in ((bo_solvers.Adam, 1e-2), (bo_solvers.SGD, 0.5)):
        solver = _solver(cls, x, y, c, lr=lr, batch_size=16)
        loss0, _ = evaluate_classifier(solver.model_init_fn(), x, y)
        solver.run(_EpochCallback(solver, epochs=3))
        loss3, _ = evaluate_classifier(solver.model, x, y)
        assert loss3 < loss0, cls.name


# ------------------------------------------------------------------ the real benchopt
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    bench = init_benchmark(tmp_path_factory.mktemp("bo") / "bench")
    proc = _benchopt("run", str(bench), *TINY, "--output", "tiny", cwd=bench)
    return bench, proc


def test_benchopt_run_end_to_end_has_every_solver_with_finite_values(tiny_run):
    bench, proc = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list((bench / "outputs").glob("tiny*.parquet"))
    assert len(files) == 1, proc.stdout[-2000:]
    df = pd.read_parquet(files[0])
    names = {s.split("[")[0] for s in df["solver_name"]}
    expected = {"ExactGN", "Adam", "SGD"} | ({"DenseGN"} if _has_dense_gn() else set())
    assert names == expected
    metrics = ["objective_value", "objective_train_loss", "objective_train_accuracy",
               "objective_test_loss", "objective_test_accuracy"]
    for name in names:
        rows = df[df["solver_name"].str.startswith(name + "[")]
        assert len(rows) >= 2, name  # initial point + at least one epoch
        assert rows[metrics].notna().all().all() and (rows[metrics].abs() < 1e6).all().all()
        trained = rows[rows["stop_val"] > 0]
        assert trained["objective_batch_loss_change"].notna().all(), name
    gn = df[df["solver_name"].str.startswith(("ExactGN[", "DenseGN["))]
    trained = gn[gn["stop_val"] > 0]
    assert ((trained["objective_exact_step_fraction"] >= 0)
            & (trained["objective_exact_step_fraction"] <= 1)).all()
    # every solver starts from the same model: same initial objective
    init_vals = df[df["stop_val"] == 0]["objective_value"].to_numpy()
    assert init_vals.max() - init_vals.min() < 1e-6
    # the leaderboard reads the real result file: one row per solver, finite metrics
    from gnrev_plugin.experiments.leaderboard import load_results, summarize

    rows = summarize(load_results([files[0]]))
    assert {r["optimizer"].split("[")[0] for r in rows} == expected
    for r in rows:
        assert math.isfinite(r["best_test_acc"]) and math.isfinite(r["final_train_loss"])
        assert r["reached"] == "1/1" and r["epochs_to_target"] >= 1


def test_benchopt_file_selector_adds_gn_to_another_benchmark(tmp_path):
    """``-s PATH`` (what ``gnrev benchopt solver-path`` prints) runs GN in a foreign benchmark."""
    bench = tmp_path / "foreign"
    (bench / "datasets").mkdir(parents=True)
    (bench / "solvers").mkdir()
    (bench / "objective.py").write_text(
        "from benchopt import BaseObjective, safe_import_context\n"
        "with safe_import_context() as import_ctx:\n"
        "    import torch\n\n\n"
        "class Objective(BaseObjective):\n"
        "    name = 'foreign classification'\n"
        "    min_benchopt_version = '1.10'\n\n"
        "    def set_data(self, X, y):\n"
        "        self.X, self.y = X, y\n\n"
        "    def get_objective(self):\n"
        "        return dict(X=self.X, y=self.y)\n\n"
        "    def evaluate_result(self, model):\n"
        "        with torch.no_grad():\n"
        "            return dict(value=float(torch.nn.functional.cross_entropy(model(self.X),"
        " self.y)))\n\n"
        "    def get_one_result(self):\n"
        "        return dict(model=torch.nn.Linear(self.X.shape[1], 3))\n")
    (bench / "datasets" / "simulated.py").write_text(
        "from benchopt import BaseDataset, safe_import_context\n"
        "with safe_import_context() as import_ctx:\n"
        "    import torch\n\n\n"
        "class Dataset(BaseDataset):\n"
        "    name = 'simulated'\n\n"
        "    def get_data(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        X = torch.randn(40, 8, generator=g)\n"
        "        return dict(X=X, y=(X[:, 0] > 0).long() + (X[:, 1] > 0).long())\n")
    (bench / "solvers" / "sgd.py").write_text(solver_path("SGD").read_text())
    path = solver_path("ExactGN")
    proc = _benchopt("run", str(bench), "-s", f"{path}[lr=0.5,batch_size=20]", "-s", "SGD",
                     "-n", "2", "-r", "1", "--no-plot", "--output", "sel", cwd=bench)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(next((bench / "outputs").glob("sel*.parquet")))
    assert {s.split("[")[0] for s in df["solver_name"]} == {"ExactGN", "SGD"}
    gn = df[df["solver_name"].str.startswith("ExactGN[")].sort_values("stop_val")
    assert gn["objective_value"].notna().all()
    assert gn["objective_value"].iloc[-1] < gn["objective_value"].iloc[0]


def test_benchopt_test_passes_on_the_shipped_benchmark(tmp_path):
    bench = init_benchmark(tmp_path / "bench")
    # benchopt joins its pytest arguments into one shell command: quote the expression once more
    proc = _benchopt("test", str(bench), "-k", "'not install'", cwd=bench, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and " failed" not in out
