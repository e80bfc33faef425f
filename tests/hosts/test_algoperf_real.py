"""AlgoPerf's own ``submission_runner`` runs the exported gnrev submission on its PyTorch MNIST
workload (issue 20, item 4).

One run, shared by the tests of this module: ``gnrev algoperf export`` writes the submission for
``gnrev.dense_gn``, ``gnrev algoperf data`` prepares the TFDS ``mnist`` dataset from the real
MNIST IDX files (the stand-in layout of
:func:`gnrev_plugin.hosts.algoperf.build_mnist_tfds`: nothing is downloaded), and AlgoPerf's
installed ``submission_runner`` (byte-identical to ``../shared/algoperf/submission_runner.py``)
trains for :data:`STEPS` updates with its own input pipeline, evaluations, checkpoints and
measurement CSVs. The assertions read only what AlgoPerf wrote: its log, ``eval_measurements.csv``,
``measurements.csv`` (where the submission records ``last_step_exact`` through AlgoPerf's metrics
logger) and its last checkpoint.

AlgoPerf and its TensorFlow/JAX dependencies live in their own interpreter, ``$GNREV_ALGOPERF_PYTHON``
(``.ci/run`` builds it from the ``algoperf`` extra; default: this interpreter), so TensorFlow never
enters the test process (``docs/runners/algoperf.md``); without them the tests skip, which fails
under ``CI``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from realdata import REAL_MNIST, needs_real_mnist

import gnrev_plugin
from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.compat.algoperf import submission_runner_command
from gnrev_plugin.hosts import algoperf as ap
from gnrev_plugin.registry import get_registry

pytestmark = [pytest.mark.slow, needs_real_mnist]

#: Updates of the run: AlgoPerf evaluates after the first and the last (``max_global_steps``).
STEPS = 10
SHARED_RUNNER = REAL_MNIST.parents[1] / "algoperf" / "submission_runner.py"
NAME = "gnrev_dense_gn"


PYTHON_ENV = "GNREV_ALGOPERF_PYTHON"
_PROBE = ("import importlib.util as u; m = ('algoperf', 'submission_runner', 'tensorflow', "
          "'tensorflow_datasets', 'jax', 'flax', 'clu'); print([n for n in m if u.find_spec(n) is "
          "None]); print(u.find_spec('submission_runner') and u.find_spec('submission_runner')"
          ".origin)")


def _algoperf_python(env: dict) -> tuple[str, Path]:
    """The interpreter with AlgoPerf and its dependencies, and its ``submission_runner.py``."""
    python = os.environ.get(PYTHON_ENV) or sys.executable
    if not Path(python).exists():
        pytest.skip(f"${PYTHON_ENV} = {python} does not exist")
    probe = subprocess.run([python, "-c", _PROBE], env=env, text=True, capture_output=True,
                           timeout=120)
    lines = probe.stdout.splitlines()
    if probe.returncode or len(lines) != 2 or lines[0] != "[]":
        pytest.skip(f"AlgoPerf or its dependencies are missing in {python} "
                    f"({probe.stdout.strip() or probe.stderr[-500:]}): see "
                    f"docs/runners/algoperf.md, or set ${PYTHON_ENV}")
    return python, Path(lines[1])


@pytest.fixture(scope="module")
def algoperf_run(tmp_path_factory):
    """Export, prepare the data, run AlgoPerf's runner once; the trial folder and the log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(gnrev_plugin.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    python, runner = _algoperf_python(env)
    if SHARED_RUNNER.exists():  # the installed runner is AlgoPerf's own, unmodified
        assert runner.read_bytes() == SHARED_RUNNER.read_bytes()
    work = tmp_path_factory.mktemp("algoperf")
    assert gnrev_main(["algoperf", "export", str(work / NAME), "--log-every", "1"]) == 0
    data = subprocess.run([python, "-m", "gnrev_plugin.cli", "algoperf", "data", str(work / "data"),
                           "--from", str(REAL_MNIST)], env=env, text=True, capture_output=True,
                          timeout=600)
    assert data.returncode == 0, data.stderr[-3000:]
    # One tuning point, the registered lr (the exported space has three, which AlgoPerf's Halton
    # search would pick from at random).
    lr = get_registry().entry("optimizer", ap.DEFAULT_OPTIMIZER).defaults["lr"]
    (work / "space.json").write_text(json.dumps({"learning_rate": {"feasible_points": [lr]}}))
    flags = ["--framework=pytorch", "--workload=mnist", f"--submission_path={NAME}/submission.py",
             "--tuning_search_space=space.json", f"--data_dir={work / 'data'}",
             f"--experiment_dir={work / 'experiments'}", f"--experiment_name={NAME}",
             # AlgoPerf draws a random seed for --rng_seed=0 ("if not rng_seed"), so 1
             f"--max_global_steps={STEPS}", "--rng_seed=1", "--torch_compile=false"]
    start = time.perf_counter()
    proc = subprocess.run(submission_runner_command(flags, python), cwd=work, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    seconds = time.perf_counter() - start
    (work / "runner.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"AlgoPerf's runner failed:\n{proc.stdout[-6000:]}"
    print(f"AlgoPerf's submission_runner: {seconds:.0f} s; log tail:\n{proc.stdout[-3000:]}")
    return work / "experiments" / NAME / "mnist_pytorch" / "trial_1", proc.stdout, lr


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_run_completed_with_algoperf_evaluations(algoperf_run):
    trial, log, lr = algoperf_run
    assert "Final mnist score" in log
    assert json.loads((trial / "hparams.json").read_text()) == {"learning_rate": lr}
    evals = _rows(trial / "eval_measurements.csv")
    steps = [int(float(r["global_step"])) for r in evals]
    assert steps[0] == 1 and steps[-1] == STEPS and steps == sorted(set(steps))
    for row in evals:  # every split evaluated on AlgoPerf's 10,000 examples
        assert int(float(row["validation/num_examples"])) == 10_000
        assert int(float(row["test/num_examples"])) == 10_000
        assert 0.0 <= float(row["validation/accuracy"]) <= 1.0
    first, last = evals[0], evals[-1]
    for split in ("train", "validation", "test"):
        assert float(last[f"{split}/loss"]) < float(first[f"{split}/loss"]), split


def test_every_dense_gn_step_was_exact(algoperf_run):
    trial, _, _ = algoperf_run
    records = [r for r in _rows(trial / "measurements.csv") if r.get("gnrev/steps")]
    assert [int(float(r["global_step"])) for r in records] == list(range(1, STEPS + 1))
    for row in records:
        assert int(float(row["gnrev/steps"])) == int(float(row["global_step"]))
        assert int(float(row["gnrev/exact_steps"])) == int(float(row["gnrev/steps"]))
        assert float(row["gnrev/last_step_exact"]) == 1.0
    losses = [float(r["gnrev/train_loss"]) for r in records]
    assert all(0 < v < 10 for v in losses)


def test_algoperf_checkpointed_the_submission_state(algoperf_run):
    trial, _, lr = algoperf_run
    ckpt = torch.load(trial / f"checkpoint_{STEPS}", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    sub = ckpt["optimizer_state"]["submission"]
    assert (sub["optimizer"], sub["loss"]) == ("gnrev.dense_gn", "cross_entropy")
    assert sub["steps"] == sub["exact_steps"] == STEPS
    groups = ckpt["optimizer_state"]["optimizer"]["param_groups"]
    assert groups[0]["lr"] == lr
    assert set(ckpt["model_params"]) == {"net.layer1.weight", "net.layer1.bias",
                                         "net.layer2.weight", "net.layer2.bias"}
