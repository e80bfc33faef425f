"""benchopt runner: the shipped benchmark runs for real (``benchopt run``, ``benchopt test``), the
solver classes do what they claim, and GN joins a foreign benchmark through ``-s PATH``.
(The files and CLI checks that need no benchopt are in ``test_benchopt_files.py``.)"""

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

from gnrev_plugin.build import build_model  # noqa: E402
from gnrev_plugin.hosts.benchopt.solvers import make_solver  # noqa: E402
from gnrev_plugin.optim import ExactGN as ExactGNOptimizer  # noqa: E402
from gnrev_plugin.registry import get_registry  # noqa: E402
from gnrev_plugin.stepping import evaluate  # noqa: E402

BENCHOPT_BIN = Path(sys.executable).with_name("benchopt")
CE = torch.nn.CrossEntropyLoss()
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
        objective = objective_cls.get_instance(hidden=16, model="gnrev.revmlp", model_options="")
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


REVMLP = dict(hidden=40, num_blocks=2, linear_first_block=False, init_std=0.1)


def _init(x, classes, name="gnrev.revmlp", options=None):
    from functools import partial

    return partial(build_model, name, REVMLP if options is None else options,
                   in_features=x.shape[1], num_classes=classes, seed=3)


def _solver(name, x, y, classes, **params):
    solver = make_solver(name).get_instance(**params)
    solver.set_objective(X=x, y=y, model_init_fn=_init(x, classes), loss="cross_entropy",
                         track_batch_loss_change=True)
    return solver


def test_solvers_are_named_and_parametrised_by_the_registry():
    reg = get_registry()
    for name in reg.names("optimizer"):
        cls = make_solver(name.removeprefix("gnrev."))
        assert cls.name == name
        defaults = reg.entry("optimizer", name).defaults
        assert cls.parameters == {"batch_size": [128], "device": ["cpu"],
                                  **{k: [v] for k, v in defaults.items()}}
    assert make_solver("exact_gn").parameters["rank_policy"] == ["warn"]  # the runners' policy


def test_exact_gn_solver_matches_a_plain_optimizer_loop():
    """The benchopt solver's epoch is exactly the optimizer loop on the solver's batch order."""
    x, y, c = _problem()
    solver = _solver("gnrev.exact_gn", x, y, c, lr=0.5, batch_size=16, rank_policy="raise")
    cb = _EpochCallback(solver, epochs=2)
    solver.run(cb)

    model = _init(x, c)()
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
            changes.append(100 * (after - before) / before)
    for p, q in zip(solver.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert cb.results[-1]["batch_loss_change"] == pytest.approx(sum(changes) / len(changes))
    assert cb.results[-1]["exact_step_fraction"] == 1.0
    assert math.isnan(cb.results[0]["batch_loss_change"])  # nothing trained before epoch 1


def test_solvers_skip_what_they_cannot_run_and_say_what_they_need():
    x, y, c = _problem()
    mlp = _init(x, c, "gnrev.mlp", dict(hidden=[8]))
    skip, reason = make_solver("exact_gn").get_instance().skip(X=x, y=y, model_init_fn=mlp)
    assert skip and "gnrev.exact_gn cannot run on this objective" in reason and "RevMLP" in reason
    assert make_solver("dense_gn").get_instance().skip(X=x, y=y, model_init_fn=mlp) == (False, None)
    skip, reason = make_solver("adam").get_instance().skip(X=x, y=y, framework="tensorflow")
    assert skip and "PyTorch" in reason
    # benchopt/benchmark_logreg_l2 gives X and ±1 float labels (and lmbd): a binary linear model
    signs = torch.where(x[:, 0] > 0, 1.0, -1.0)
    for name in ("exact_gn", "adam"):
        skip, reason = make_solver(name).get_instance().skip(X=x.numpy(), y=signs.numpy(),
                                                             lmbd=0.1, fit_intercept=False)
        assert skip and "float labels y of shape (48,)" in reason and "integer class labels" in reason
    assert make_solver("adam").get_instance().skip(X=x, y=y) == (False, None)


def test_first_order_solvers_decrease_the_training_loss():
    x, y, c = _problem(seed=2)
    for name, lr in (("gnrev.adam", 1e-2), ("gnrev.sgd", 0.5)):
        solver = _solver(name, x, y, c, lr=lr, batch_size=16)
        loss0, _ = evaluate(solver.model_init_fn(), CE, x, y)
        solver.run(_EpochCallback(solver, epochs=3))
        loss3, _ = evaluate(solver.model, CE, x, y)
        assert loss3 < loss0, name


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
    expected = set(get_registry().names("optimizer"))  # one solver per registered optimizer
    assert names == expected
    metrics = ["objective_value", "objective_train_loss", "objective_train_accuracy",
               "objective_test_loss", "objective_test_accuracy"]
    for name in names:
        rows = df[df["solver_name"].str.startswith(name + "[")]
        assert len(rows) >= 2, name  # initial point + at least one epoch
        assert rows[metrics].notna().all().all() and (rows[metrics].abs() < 1e6).all().all()
        trained = rows[rows["stop_val"] > 0]
        assert trained["objective_batch_loss_change"].notna().all(), name
    gn = df[df["solver_name"].str.startswith(("gnrev.exact_gn[", "gnrev.dense_gn["))]
    trained = gn[gn["stop_val"] > 0]
    assert ((trained["objective_exact_step_fraction"] >= 0)
            & (trained["objective_exact_step_fraction"] <= 1)).all()
    # every solver starts from the same model: same initial objective
    init_vals = df[df["stop_val"] == 0]["objective_value"].to_numpy()
    assert init_vals.max() - init_vals.min() < 1e-6
    # the leaderboard reads the real result file: one row per solver, finite metrics
    from gnrev_plugin.hosts.leaderboard import load_results, summarize

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
    (bench / "solvers" / "sgd.py").write_text(solver_path("gnrev.sgd").read_text())
    path = solver_path("exact_gn")
    proc = _benchopt("run", str(bench), "-s", f"{path}[lr=0.5,batch_size=20]", "-s", "gnrev.sgd",
                     "-n", "2", "-r", "1", "--no-plot", "--output", "sel", cwd=bench)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(next((bench / "outputs").glob("sel*.parquet")))
    assert {s.split("[")[0] for s in df["solver_name"]} == {"gnrev.exact_gn", "gnrev.sgd"}
    gn = df[df["solver_name"].str.startswith("gnrev.exact_gn[")].sort_values("stop_val")
    assert gn["objective_value"].notna().all()
    assert gn["objective_value"].iloc[-1] < gn["objective_value"].iloc[0]


def test_gn_solver_skips_a_binary_logreg_benchmark_with_a_message(tmp_path, monkeypatch):
    """As in benchopt/benchmark_logreg_l2: X, ±1 float labels, lmbd. The GN solver file placed in
    it with ``-s PATH`` must skip and say why, not crash inside the optimizer."""
    monkeypatch.setenv("GNREV_CACHE_DIR", str(tmp_path / "cache"))
    bench = tmp_path / "logreg"
    (bench / "datasets").mkdir(parents=True)
    (bench / "solvers").mkdir()
    (bench / "objective.py").write_text(
        "from benchopt import BaseObjective, safe_import_context\n"
        "with safe_import_context() as import_ctx:\n"
        "    import numpy as np\n\n\n"
        "class Objective(BaseObjective):\n"
        "    name = 'L2 logistic regression'\n"
        "    min_benchopt_version = '1.10'\n\n"
        "    def set_data(self, X, y):\n"
        "        self.X, self.y = X, y\n\n"
        "    def get_objective(self):\n"
        "        return dict(X=self.X, y=self.y, lmbd=1.0, fit_intercept=False)\n\n"
        "    def evaluate_result(self, beta):\n"
        "        return dict(value=float(np.log1p(np.exp(-self.y * (self.X @ beta))).sum()))\n\n"
        "    def get_one_result(self):\n"
        "        return dict(beta=np.zeros(self.X.shape[1]))\n")
    (bench / "datasets" / "simulated.py").write_text(
        "from benchopt import BaseDataset, safe_import_context\n"
        "with safe_import_context() as import_ctx:\n"
        "    import numpy as np\n\n\n"
        "class Dataset(BaseDataset):\n"
        "    name = 'simulated'\n\n"
        "    def get_data(self):\n"
        "        rng = np.random.default_rng(0)\n"
        "        X = rng.standard_normal((50, 10))\n"
        "        return dict(X=X, y=np.sign(X[:, 0]))\n")
    proc = _benchopt("run", str(bench), "-s", str(solver_path("exact_gn")), "-n", "2", "-r", "1",
                     "--no-plot", "--no-html", cwd=bench)
    out = proc.stdout + proc.stderr
    assert "num_classes must be" not in out and "Traceback" not in out, out[-3000:]
    assert "float labels y of shape (50,)" in out, out[-3000:]


def test_benchopt_test_passes_on_the_shipped_benchmark(tmp_path):
    bench = init_benchmark(tmp_path / "bench")
    # benchopt joins its pytest arguments into one shell command: quote the expression once more
    proc = _benchopt("test", str(bench), "-k", "'not install'", cwd=bench, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and " failed" not in out
