"""``gnrev reproduce exact-gn`` for long sweeps (the ``paper`` preset): the sweep order, the
per-epoch resource log (time, peak memory, CPU, load) and a report built from a partially
finished sweep that marks unfinished and not-started runs instead of dropping or mixing them."""

import json
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin.cli import main
from gnrev_plugin.engine import Callback, Interrupted
from gnrev_plugin.engine.rundir import read_jsonl
from gnrev_plugin.experiments.catalog import build_report
from gnrev_plugin.experiments.exact_gn import exact_gn_run_specs, run_exact_gn
from gnrev_plugin.experiments.exact_gn.figures import _panel
from gnrev_plugin.experiments.exact_gn.report import RESOURCES_LOG
from gnrev_plugin.experiments.presets import get_preset

TINY = dict(hidden=16, blocks=2, linear_first_block=True, seeds=[0, 1],
            optimizers=["adam", "sgd"], probe_size=8, full_batch=dict(subset=16, epochs=2),
            mini_batch=dict(batch_size=16, epochs=2, train_size=32, test_size=32))


def test_sweep_runs_every_optimizer_at_a_seed_before_the_next_seed():
    """A sweep stopped early must compare the optimizers on the same seeds: within a setting
    the order is seed-major (bug: optimizer-major order runs all GN seeds first)."""
    preset = get_preset("exact-gn", "paper")
    names = [n for n, _, _ in exact_gn_run_specs(preset, "mnist")]
    k = len(preset["optimizers"])
    assert names[:k] == [f"full_batch/{o}/seed{preset['seeds'][0]}"
                         for o in preset["optimizers"]]
    settings = [n.split("/")[0] for n in names]
    assert settings == sorted(settings, key=["full_batch", "mini_batch"].index)
    assert len(set(names)) == 2 * k * len(preset["seeds"])


@pytest.fixture(scope="module")
def stopped_sweep(tmp_path_factory):
    """The TINY sweep killed after epoch 1 of its second run (full_batch/sgd/seed0)."""
    out = tmp_path_factory.mktemp("stopped")
    calls = []

    class Kill(Callback):
        def on_checkpoint(self, state, row):
            calls.append(row["epoch"])
            if len(calls) == 5:   # run 1: epochs 0, 1, 2; run 2: epochs 0, 1
                raise Interrupted("simulated kill")
    with pytest.raises(Interrupted):
        run_exact_gn(out, "tiny", data_dir=str(REAL_MNIST), progress=False, preset=TINY,
                     callbacks=[Kill()])
    return out


def _section(report: str, title: str) -> str:
    start = report.index(title)
    nxt = report.find("\n#", start + len(title))
    return report[start:] if nxt < 0 else report[start:nxt]


@needs_real_mnist
def test_report_of_a_partial_sweep_marks_unfinished_and_not_started_runs(stopped_sweep):
    out = stopped_sweep
    assert main(["report", str(out)]) == 0          # bug: a crash on a partial sweep
    report = (out / "report.md").read_text()
    assert "This sweep is not finished" in report
    assert "* **full batch:** 1 of 4 runs finished, 1 unfinished (at epoch 1), 2 not started." \
        in report
    assert "* **mini-batch:** 0 of 4 runs finished, 4 not started." in report
    # every run of the preset is listed, the stopped one with its progress (bug: dropped)
    assert re.search(r"\| full_batch/sgd/seed0 +\| \*\*unfinished\*\* +\| 1 / 2 ", report)
    for name in ("full_batch/adam/seed1", "full_batch/sgd/seed1", "mini_batch/adam/seed0"):
        assert re.search(rf"\| {name} +\| not started ", report), name
    # the final-numbers table holds finished runs only (bug: the unfinished SGD run mixed in)
    table = _section(report, "### Full batch")
    assert re.search(r"\| Adam +\| 1 / 2 +\| +2 \|", table)
    assert "| SGD" not in table
    assert "No finished run yet" in _section(report, "### Mini-batch")


@needs_real_mnist
def test_unfinished_runs_are_drawn_dashed_and_labelled(stopped_sweep):
    from gnrev_plugin.experiments.exact_gn.report import _group
    from gnrev_plugin.experiments.tables import collect_runs

    runs = collect_runs(stopped_sweep)
    fig, ax = plt.subplots()
    try:
        assert _panel(ax, _group(runs), "full_batch", "train_loss", "t", "y",
                      partial=_group(runs, "unfinished"))
        styles = {line.get_label(): line.get_linestyle() for line in ax.lines}
    finally:
        plt.close(fig)
    assert styles == {"Adam": "-", "SGD, unfinished (1 run, to epoch 1)": "--"}


@needs_real_mnist
def test_resources_have_one_row_per_epoch_tied_to_the_log(tmp_path):
    preset = dict(TINY, seeds=[0], optimizers=["sgd"])
    for _ in range(2):   # a second run into the same directory without --resume starts over
        run_exact_gn(tmp_path, "tiny", data_dir=str(REAL_MNIST), progress=False, preset=preset)
    run = tmp_path / "runs/full_batch/sgd/seed0"
    res, log = read_jsonl(run / RESOURCES_LOG), read_jsonl(run / "log.jsonl")
    assert [r["epoch"] for r in res] == [r["epoch"] for r in log] == [0, 1, 2]  # bug: appended
    assert [r["time_s"] for r in res] == [r["time_s"] for r in log]
    rss = [r["maxrss_mib"] for r in res]
    assert rss == sorted(rss) and rss[0] > 50      # MiB (ru_maxrss is KiB on Linux)
    assert all(r["cpu_s"] >= 0 and r["threads"] == torch.get_num_threads()
               and r["load1"] >= 0 for r in res)
    # the report's resource row sums the logs' training clocks, takes the peak of the peak RSS
    # and the mean [min–max] of the load (rows rewritten with distinct values)
    for r, m, load in zip(res, (300.0, 700.0, 500.0), (1.0, 5.0, 3.0), strict=True):
        r.update(maxrss_mib=m, load1=load)
    (run / RESOURCES_LOG).write_text("".join(json.dumps(r) + "\n" for r in res))
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    row = re.search(r"\| full batch +\| \*\*all\*\* +\|([^\n]*)", report).group(1)
    cells = [c.strip() for c in row.split("|")]
    assert cells[0] == "1 / 1" and cells[1] == "2"
    assert float(cells[2]) == pytest.approx(log[-1]["time_s"], rel=1e-3)
    assert cells[6:8] == ["700", "3.0 [1.0–5.0]"]



DOCS_RUN = Path(__file__).parents[2] / "docs/results/paper_preset"


def test_committed_paper_run_is_todays_paper_preset():
    """docs/results/paper_preset was made with today's ``paper`` preset (bug: the preset changed and the
    committed numbers no longer describe it)."""
    cfg = json.loads((DOCS_RUN / "config.json").read_text())
    assert cfg["experiment"] == "exact-gn" and cfg["preset_name"] == "paper"
    assert cfg["preset"] == get_preset("exact-gn", "paper")


def test_committed_paper_run_rebuilds_its_report_from_logs_alone(tmp_path):
    """``gnrev report`` rebuilds docs/results/paper_preset's report from its JSON logs (no checkpoints
    are committed) and marks each run's status as the committed report does."""
    out = tmp_path / "paper"
    shutil.copytree(DOCS_RUN, out)
    assert not list(out.rglob("checkpoint.pt"))
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    rebuilt = (out / "report.md").read_text()
    committed = (DOCS_RUN / "report.md").read_text()
    status = re.compile(r"^\| ((?:full|mini)_batch/\S+) +\| (\S+(?: \S+)?) +\|", re.M)
    assert status.findall(rebuilt) == status.findall(committed)
    assert len(status.findall(rebuilt)) == 18
