"""Leaderboards: reading benchopt / DeepOBS / gnrev results, the summary metrics, and merging GN
rows into existing CSV and Markdown leaderboards without touching their columns or rows."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from gnrev_plugin.build import RunSpec
from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.hosts import leaderboard as lb

try:
    import pandas as pd
except ImportError:  # pandas comes with the benchopt extra
    pd = None
needs_pandas = pytest.mark.skipif(pd is None, reason="benchopt result files are read with pandas "
                                  "(pip install 'gnrev-plugin[benchopt]')")

# two seeds of ExactGN and one of Adam on one problem; losses chosen per epoch
GN_SEEDS = {0: [2.0, 0.9, 0.5, 0.4], 1: [2.1, 1.2, 0.45, 0.3]}
ADAM = [2.0, 1.5, 1.1, 0.8]


def _benchopt_csv(path):
    rows = []
    for solver, curves in (("ExactGN[lr=0.2]", GN_SEEDS), ("Adam[lr=0.001]", {0: ADAM})):
        for rep, losses in curves.items():
            for epoch, loss in enumerate(losses):
                rows.append(dict(objective_name="gnrev classification", dataset_name="simulated",
                                 solver_name=solver, idx_rep=rep, stop_val=epoch,
                                 time=1.5 * epoch + rep, objective_value=loss,
                                 objective_train_loss=loss, objective_test_loss=loss + 0.1,
                                 objective_test_accuracy=0.5 + 0.1 * epoch - 0.05 * rep))
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _deepobs_json(root, optimizer, seed, train, acc):
    folder = root / "mnist_revmlp" / optimizer / "num_epochs__2__batch_size__32__lr__1.e-01"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"testproblem": "mnist_revmlp", "batch_size": 32, "num_epochs": len(train) - 1,
            "random_seed": seed, "weight_decay": None, "optimizer_name": optimizer,
            "optimizer_hyperparams": {"lr": 0.1}, "training_params": {},
            "train_losses": train, "valid_losses": train, "test_losses": [t + 0.2 for t in train],
            "minibatch_train_losses": train, "train_accuracies": acc, "valid_accuracies": acc,
            "test_accuracies": acc}
    (folder / f"random_seed__{seed}__2026-01-01-00-00-00.json").write_text(json.dumps(data))


def _gnrev_run(path, optimizer, seed, losses):
    run = RunDir(path)
    spec = RunSpec(model="revmlp", model_kwargs=dict(hidden=64), optimizer=optimizer,
                   optimizer_kwargs=dict(lr=0.1), dataset="mnist", batch_size=32, seed=seed,
                   epochs=len(losses) - 1).resolve()
    run.write_config(dict(spec=spec.to_dict()), resume=False)  # as train_run writes it
    for epoch, loss in enumerate(losses):
        run.log(dict(epoch=epoch, train_loss=loss, train_acc=0.5, test_loss=loss + 0.3,
                     test_acc=0.6 + 0.01 * epoch, steps=10 * epoch, time_s=2.0 * epoch))


def _row(rows, optimizer_prefix):
    (row,) = [r for r in rows if r["optimizer"].startswith(optimizer_prefix)]
    return row


# ------------------------------------------------------------------ readers and metrics
@needs_pandas
def test_benchopt_summary_metrics(tmp_path):
    curves = lb.load_results([_benchopt_csv(tmp_path / "res.csv")])
    assert len(curves) == 3 and {c.source for c in curves} == {"benchopt"}
    rows = lb.summarize(curves, target_loss=0.5)
    gn, adam = _row(rows, "ExactGN"), _row(rows, "Adam")
    assert gn["runs"] == 2 and adam["runs"] == 1
    # best accuracy: per seed max over epochs, then the mean over seeds
    assert gn["best_test_acc"] == pytest.approx((0.8 + 0.75) / 2)
    assert gn["best_test_loss"] == pytest.approx((0.4 + 0.3) / 2 + 0.1)
    assert gn["final_train_loss"] == pytest.approx(0.35)
    # target 0.5: seed 0 reaches it at epoch 2 (time 3.0), seed 1 at epoch 2 (time 4.0)
    assert gn["reached"] == "2/2" and gn["epochs_to_target"] == 2
    assert gn["time_to_target_s"] == pytest.approx(3.5)
    assert adam["reached"] == "0/1" and adam["time_to_target_s"] is None
    accs = [r["best_test_acc"] for r in rows]
    assert accs == sorted(accs, reverse=True)  # one problem, best accuracy first


def test_default_target_is_the_loss_every_improving_run_reaches(tmp_path):
    _deepobs_json(tmp_path, "ExactGN", 1, [2.0, 0.5, 0.2], [0.1, 0.8, 0.9])
    _deepobs_json(tmp_path, "SGD", 1, [2.0, 1.0, 0.7], [0.1, 0.5, 0.6])
    _deepobs_json(tmp_path, "Adam", 1, [2.0, math.inf, math.inf], [0.1, 0.0, 0.0])  # diverged
    rows = lb.summarize(lb.load_results([tmp_path]))
    assert {r["target_loss"] for r in rows} == {0.7}
    gn, sgd = _row(rows, "ExactGN"), _row(rows, "SGD")
    assert gn["epochs_to_target"] == 1 and sgd["epochs_to_target"] == 2
    assert gn["time_to_target_s"] is None  # DeepOBS records no wall time
    assert gn["optimizer"] == "ExactGN[lr=0.1]" and gn["problem"] == "mnist_revmlp (bs=32)"
    assert _row(rows, "Adam")["reached"] == "0/1"


def test_gnrev_run_logs_are_read_with_steps(tmp_path):
    _gnrev_run(tmp_path / "runs" / "gn", "exact_gn", 0, [2.0, 1.0, 0.5])
    _gnrev_run(tmp_path / "runs" / "sgd", "sgd", 0, [2.0, 1.5, 1.0])
    (tmp_path / "runs" / "gn" / "log.jsonl").open("a").write('{"epoch": 3, "train_lo')  # torn
    rows = lb.summarize(lb.load_results([tmp_path / "runs"]))
    gn = _row(rows, "gnrev.exact_gn[")  # rows are named by registry name and options
    assert gn["optimizer"] == "gnrev.exact_gn[lr=0.1,rank_policy=warn]"
    assert _row(rows, "gnrev.sgd[")["optimizer"] == "gnrev.sgd[lr=0.1]"
    assert gn["target_loss"] == 1.0 and gn["steps_to_target"] == 10
    assert gn["time_to_target_s"] == 2.0
    assert gn["best_test_acc"] == pytest.approx(0.62)
    assert gn["problem"].startswith("gnrev.mnist (gnrev.revmlp[") and "hidden=64" in gn["problem"]
    assert gn["problem"].endswith(", bs=32)")


@needs_pandas
def test_parquet_and_bad_inputs(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow")
    df = pd.read_csv(_benchopt_csv(tmp_path / "res.csv"))
    df.to_parquet(tmp_path / "res.parquet")
    a = lb.summarize(lb.load_results([tmp_path / "res.parquet"]))
    b = lb.summarize(lb.load_results([tmp_path / "res.csv"]))
    assert a == b
    with pytest.raises(FileNotFoundError):
        lb.load_results([tmp_path / "missing.parquet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        lb.load_results([tmp_path / "empty"])
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match="not a benchopt result"):
        lb.load_results([tmp_path / "other.csv"])


@pytest.mark.parametrize("name, gn", [("ExactGN[lr=0.2]", True), ("DenseGN", True),
                                      ("exact_gn[lr=0.1]", True), ("gauss-newton", True),
                                      ("SGD[lr=0.1]", False), ("Adam", False),
                                      ("signum", False), ("lbfgs", False)])
def test_is_gn_optimizer(name, gn):
    assert lb.is_gn_optimizer(name) is gn


# ------------------------------------------------------------------ merging
EXISTING_CSV = ('Rank,Submission,Authors,Test acc. (%),Time to target (s),Notes\n'
                '1,"Shampoo, distributed",A. B.,98.10,120.5,"tuned, 5 seeds"\n'
                '2,NadamW,C. D.,97.60,150.0,\n')

EXISTING_MD = """# Optimizer leaderboard

Results on our MNIST setup.

| Rank | Method | Best test accuracy | Test loss | Wall-clock |
|-----:|:-------|-------------------:|----------:|-----------:|
| 1 | Adam | 0.981 | 0.061 | 35 s |
| 2 | SGD  | 0.975 | 0.080 | 41 s |

Footnote: times on one CPU core.
"""


def _gn_rows(tmp_path):
    return lb.summarize(lb.load_results([_benchopt_csv(tmp_path / "res.csv")]),
                        target_loss=0.5)


@needs_pandas
def test_merge_csv_keeps_columns_and_rows(tmp_path):
    table = tmp_path / "board.csv"
    table.write_text(EXISTING_CSV)
    rows = [r for r in _gn_rows(tmp_path) if lb.is_gn_optimizer(r["optimizer"])]
    merged = lb.merge_into_table(table, rows)
    assert merged.startswith(EXISTING_CSV)  # every existing byte untouched
    parsed = list(csv.reader(io.StringIO(merged)))
    original = list(csv.reader(io.StringIO(EXISTING_CSV)))
    assert parsed[:len(original)] == original
    new = dict(zip(parsed[0], parsed[-1], strict=True))
    assert len(parsed) == len(original) + 1
    assert new["Submission"].startswith("ExactGN")
    assert float(new["Test acc. (%)"]) == pytest.approx(100 * (0.8 + 0.75) / 2, rel=1e-3)
    assert float(new["Time to target (s)"]) == pytest.approx(3.5)
    assert new["Rank"] == new["Authors"] == new["Notes"] == ""


@needs_pandas
def test_merge_markdown_keeps_text_columns_and_rows(tmp_path):
    table = tmp_path / "board.md"
    table.write_text(EXISTING_MD)
    rows = [r for r in _gn_rows(tmp_path) if lb.is_gn_optimizer(r["optimizer"])]
    merged = lb.merge_into_table(table, rows, column_map={"Wall-clock": "time_to_target_s"})
    old_lines, new_lines = EXISTING_MD.splitlines(), merged.splitlines()
    table_end = old_lines.index("| 2 | SGD  | 0.975 | 0.080 | 41 s |") + 1
    assert new_lines[:table_end] == old_lines[:table_end]
    assert new_lines[table_end + 1:] == old_lines[table_end:]
    cells = [c.strip() for c in new_lines[table_end].strip().strip("|").split("|")]
    assert len(cells) == 5
    assert cells[0] == "" and cells[1].startswith("ExactGN")
    assert float(cells[2]) == pytest.approx((0.8 + 0.75) / 2, rel=1e-3)  # table uses fractions
    assert float(cells[3]) == pytest.approx(0.45, rel=1e-3)
    assert float(cells[4]) == pytest.approx(3.5)


@needs_pandas
def test_merge_rejects_unknown_columns_and_metrics(tmp_path):
    table = tmp_path / "board.csv"
    table.write_text(EXISTING_CSV)
    rows = _gn_rows(tmp_path)
    with pytest.raises(ValueError, match="does not have"):
        lb.merge_into_table(table, rows, column_map={"Score": "best_test_acc"})
    with pytest.raises(ValueError, match="unknown metrics"):
        lb.merge_into_table(table, rows, column_map={"Notes": "flops"})
    md = tmp_path / "plain.md"
    md.write_text("no table here\n")
    with pytest.raises(ValueError, match="no Markdown pipe table"):
        lb.merge_into_table(md, rows)


@needs_pandas
def test_cli_writes_tables_and_merges_gn_rows(tmp_path, capsys):
    res = _benchopt_csv(tmp_path / "res.csv")
    board = tmp_path / "board.md"
    board.write_text(EXISTING_MD)
    out_md, out_csv, merged = tmp_path / "lb.md", tmp_path / "lb.csv", tmp_path / "merged.md"
    assert gnrev_main(["leaderboard", str(res), "--target-loss", "0.5", "--md", str(out_md),
                       "--csv", str(out_csv), "--merge", str(board), "--out", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "ExactGN[lr=0.2]" in printed and "Adam[lr=0.001]" in printed
    assert out_md.read_text().splitlines()[0].startswith("| problem")
    table = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert {r["optimizer"] for r in table} == {"ExactGN[lr=0.2]", "Adam[lr=0.001]"}
    gn_row = next(r for r in table if r["optimizer"] == "ExactGN[lr=0.2]")
    assert float(gn_row["time_to_target_s"]) == pytest.approx(3.5)
    text = merged.read_text()
    assert text.count("\n| ") == EXISTING_MD.count("\n| ") + 1  # only the GN row was added
    assert "ExactGN" in text and "Adam[lr" not in text
    assert board.read_text() == EXISTING_MD  # the source table is not modified
    # no GN rows to merge is an error, not a silent no-op
    sgd_only = tmp_path / "sgd.csv"
    pd.read_csv(res).query("solver_name.str.startswith('Adam')").to_csv(sgd_only, index=False)
    assert gnrev_main(["leaderboard", str(sgd_only), "--merge", str(board)]) == 2
    assert "no Gauss-Newton rows" in capsys.readouterr().err
