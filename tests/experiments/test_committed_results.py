"""Every committed report still matches the code: a cheap slice of each (one run, its first few
epochs, the same config read from the committed ``config.json``) is rerun and its log compared
with the committed ``log.jsonl``.

A change of the numerics (e.g. b4577c7, which made ExactGN's Cholesky rank check stop accepting
numerically singular Grams and moved the exact-gn quick mini-batch GN run's epoch-1 train loss
by 1.2e-3 relative, its final NTK similarity from 0.86 to 0.95) fails here, so a committed table
cannot silently drift from the code.

**Tolerance.** The models train in float32. Rerun with the same thread count the numbers are
bitwise equal; but torch splits a CPU reduction (matmul, sum) differently over another number of
threads, which changes the float32 rounding (≈1e-7 relative per operation) and the few epochs
compared grow it to at most ~1e-5. Losses must agree to ``LOSS_RTOL = 1e-4`` relative (one
order above that, two below the b4577c7 change); accuracies to one sample (a sample on the
decision boundary may flip under such rounding).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin.build import RunSpec
from gnrev_plugin.engine import BatchLossChange, train_run
from gnrev_plugin.engine.rundir import RunDir, read_jsonl
from gnrev_plugin.experiments.exact_gn.run import load_exact_gn_data
from gnrev_plugin.experiments.laziness.run import load_laziness_data

pytestmark = [pytest.mark.slow]

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"

LOSS_RTOL = 1e-4
LOSS_KEYS = ("train_loss", "test_loss", "batch_loss_change_pct")
ACC_KEYS = ("train_acc", "test_acc")

#: The slice of each committed report: (run under ``runs/``, epochs rerun). GN runs, because
#: their numbers are the ones a solver change moves; each takes well under 60 s on one core.
SLICES = {
    "exact_gn_quick": ("mini_batch/exact_gn/seed42", 2),
    "paper_preset": ("full_batch/exact_gn/seed42", 1),
    "laziness/mnist_quick": ("exact_gn-exact/M512/paper/lr1/seed0", 3),
    "laziness/mnist1d_quick": ("exact_gn-exact/M512/paper/lr1/seed0", 3),
}


def committed_reports() -> list[str]:
    """Every committed report directory with run logs (``config.json`` naming an experiment)."""
    found = []
    for cfg in sorted(RESULTS.rglob("config.json")):
        if "runs" in cfg.relative_to(RESULTS).parts:
            continue
        if "experiment" in json.loads(cfg.read_text()) and (cfg.parent / "runs").is_dir():
            found.append(cfg.parent.relative_to(RESULTS).as_posix())
    return found


def test_every_committed_report_has_a_slice():
    """A newly committed report must be given a slice here (bug: it would go unchecked)."""
    assert set(committed_reports()) == set(SLICES)


def _dataset(top: dict, run_cfg: dict):
    data_dir = None if top["data"] == "mnist1d" else str(REAL_MNIST)
    if top["experiment"] == "exact-gn":
        return load_exact_gn_data(top["preset"], top["data"], data_dir)[run_cfg["setting"]]
    if top["experiment"] == "laziness":
        return load_laziness_data(top["preset"], top["data"], data_dir)
    raise AssertionError(f"no data loader for experiment {top['experiment']!r}")


def compare_rows(committed: list[dict], fresh: list[dict]) -> list[str]:
    """The fields of ``fresh`` outside the tolerance of ``committed`` (row by row, by epoch)."""
    bad = []
    for old, new in zip(committed, fresh, strict=True):
        assert old["epoch"] == new["epoch"]
        for key in LOSS_KEYS:
            a, b = old.get(key), new.get(key)
            if a is None and b is None:
                continue
            if a is None or b is None or not math.isclose(a, b, rel_tol=LOSS_RTOL, abs_tol=1e-12):
                bad.append(f"epoch {old['epoch']} {key}: committed {a}, now {b}")
        for key, n in (("train_acc", new["_n_train"]), ("test_acc", new["_n_test"])):
            if key in old and abs(old[key] - new[key]) > 1.0 / n + 1e-12:
                bad.append(f"epoch {old['epoch']} {key}: committed {old[key]}, now {new[key]}")
    return bad


@needs_real_mnist
@pytest.mark.parametrize("report", sorted(SLICES))
def test_committed_report_reproduces(report, tmp_path):
    """Rerun the slice with the committed config and compare with the committed log."""
    root = RESULTS / report
    if not root.is_dir():
        pytest.fail(f"{report} is in SLICES but not committed under docs/results")
    run_name, epochs = SLICES[report]
    top = json.loads((root / "config.json").read_text())
    run_dir = root / "runs" / run_name
    run_cfg = json.loads((run_dir / "config.json").read_text())
    ds = _dataset(top, run_cfg)
    assert ds.info.get("source") == run_cfg["data_info"].get("source"), "other data than committed"
    spec = RunSpec.from_dict({**run_cfg["spec"], "epochs": epochs})
    train_run(spec, ds, RunDir(tmp_path), [BatchLossChange()], progress=False)
    fresh = read_jsonl(tmp_path / "log.jsonl")
    committed = [r for r in read_jsonl(run_dir / "log.jsonl") if r["epoch"] <= epochs]
    for row in fresh:
        row["_n_train"], row["_n_test"] = len(ds.y_train), max(len(ds.y_test), 1)
    bad = compare_rows(committed, fresh)
    assert not bad, f"{report}/{run_name} no longer matches its committed log:\n" + "\n".join(bad)
