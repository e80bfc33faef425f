"""The leaderboard's problem key holds the dataset's options: runs on 2,048 and on 8,000 MNIST
images never share a row or a target (issue 22, item 4). Planted: ``read_runs`` naming the
problem by the dataset alone (today's key) -> one row of 2 runs with one shared target."""

import pytest

from gnrev_plugin.build import RunSpec
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.hosts import leaderboard as lb


def _run(path, train_size, losses, data_dir):
    run = RunDir(path)
    spec = RunSpec(model="revmlp", model_kwargs=dict(hidden=64), optimizer="exact_gn",
                   optimizer_kwargs=dict(lr=0.1), dataset="mnist",
                   dataset_kwargs=dict(train_size=train_size, data_dir=data_dir), batch_size=32,
                   epochs=len(losses) - 1).resolve()
    run.write_config(dict(spec=spec.to_dict()), resume=False)  # as train_run writes it
    for epoch, loss in enumerate(losses):
        run.log(dict(epoch=epoch, train_loss=loss, train_acc=0.5, test_loss=loss, test_acc=0.6,
                     steps=10 * epoch, time_s=float(epoch)))


def test_runs_on_different_training_sizes_get_their_own_rows_and_targets(tmp_path):
    _run(tmp_path / "small", 2048, [2.0, 0.5, 0.2], "/data/a")
    _run(tmp_path / "large", 8000, [2.0, 1.5, 1.0], "/data/a")
    _run(tmp_path / "large-elsewhere", 8000, [2.0, 1.4, 0.9], "/other/copy")
    rows = lb.summarize(lb.load_results([tmp_path]))
    assert len(rows) == 2
    by_problem = {r["problem"]: r for r in rows}
    small = next(r for p, r in by_problem.items() if p.startswith("gnrev.mnist[train_size=2048] ("))
    large = next(r for p, r in by_problem.items() if p.startswith("gnrev.mnist[train_size=8000] ("))
    assert small["runs"] == 1 and large["runs"] == 2   # the data's location is not the problem
    assert small["target_loss"] == pytest.approx(0.2)  # each problem its own target
    assert large["target_loss"] == pytest.approx(1.0)
    assert small["reached"] == "1/1" and large["reached"] == "2/2"
