"""``gnrev train`` on tiny real and synthetic data: logs, printed epochs, resume, errors."""

import json

import pytest
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin.cli import main
from gnrev_plugin.engine.rundir import read_jsonl

SMALL = ["--epochs", "2", "--batch-size", "32", "--model-opt", "hidden=64", "--no-progress"]


@needs_real_mnist
@pytest.mark.parametrize("optimizer", ["exact_gn", "adam", "sgd"])
def test_train_on_real_mnist_logs_every_epoch(tmp_path, capsys, optimizer):
    out = tmp_path / "run"
    rc = main(["train", "--optimizer", optimizer, "--data", "mnist", "--data-dir",
               str(REAL_MNIST), "--train-size", "96", "--out", str(out), *SMALL])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"with gnrev.{optimizer}(" in printed and "epoch   2" in printed
    rows = read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert r["train_loss"] > 0 and r["test_loss"] > 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it trains
    assert rows[1]["batch_loss_change_pct"] < 0
    spec = json.loads((out / "config.json").read_text())["spec"]
    assert spec["optimizer"] == f"gnrev.{optimizer}" and spec["model_kwargs"]["hidden"] == 64
    # the one set of runner defaults, recorded resolved (gnrev_plugin.defaults)
    assert spec["model_kwargs"]["linear_first_block"] is True
    if optimizer == "exact_gn":  # batch 32 ≤ M+1 = 65: the ReLU block carries the step
        assert spec["optimizer_kwargs"]["rank_policy"] == "warn"
        assert rows[-1]["exact_frac"] == 1.0


def test_train_resume_continues_exactly(tmp_path, monkeypatch):
    from gnrev_plugin import engine

    args = ["train", "--optimizer", "adam", "--data", "teacher-student", *SMALL,
            "--epochs", "3", "--opt", "lr=1e-2"]
    main([*args, "--out", str(tmp_path / "full")])

    class KilledAfterEpoch1(engine.EpochEnd):   # the command's per-epoch callback, then a kill
        def on_checkpoint(self, state, row):
            super().on_checkpoint(state, row)
            if row["epoch"] == 1:
                raise engine.Interrupted("simulated kill")
    monkeypatch.setattr(engine, "EpochEnd", KilledAfterEpoch1)
    with pytest.raises(engine.Interrupted):
        main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "cut" / "log.jsonl")] == [0, 1]
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
    assert strip(read_jsonl(tmp_path / "cut" / "log.jsonl")) == strip(
        read_jsonl(tmp_path / "full" / "log.jsonl"))


def test_resume_refuses_a_different_config(tmp_path):
    args = ["train", "--optimizer", "sgd", "--data", "teacher-student", *SMALL,
            "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main([*args, "--resume", "--opt", "lr=0.5"]) == 2  # clear error, not a silent restart


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "o"), *SMALL])
    assert rc == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte.gz" in err and "t10k-labels-idx1-ubyte.gz" in err
    assert str(tmp_path / "nowhere") in err


def test_train_on_mnist1d(tmp_path):
    assert main(["train", "--optimizer", "exact_gn", "--data", "mnist1d", "--out",
                 str(tmp_path), *SMALL, "--epochs", "1"]) == 0
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["exact_frac"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "lbfgs"], "no optimizer named 'lbfgs'; known optimizers: gnrev.adam, "
                               "gnrev.dense_gn, gnrev.exact_gn, "),
    (["--model", "resnet"], "no model named 'resnet'; known models: gnrev.mlp, gnrev.revmlp"),
    (["--data", "cifar"], "no dataset named 'cifar'; known datasets: gnrev.fashion_mnist"),
    (["--metric", "linear_cka"], "'gnrev.linear_cka' is a library function, not a run metric"),
    (["--opt", "momentum=0.9"], "optimizer 'gnrev.exact_gn' rejected its options"),
    (["--opt", "lr"], "options are KEY=VALUE, got 'lr'"),
])
def test_bad_names_and_options_are_clear_errors(tmp_path, capsys, args, message):
    assert main(["train", "--data", "teacher-student", "--out", str(tmp_path), *SMALL, *args]) == 2
    assert message in capsys.readouterr().err


def test_run_spec_round_trips_and_rejects_unknown_keys():
    from gnrev_plugin.build import RunSpec

    spec = RunSpec(model="mlp", model_kwargs={"hidden": [4, 4]}, metrics=["cka_to_init"],
                   dataset_kwargs={"train_size": 64}).resolve()
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.model == "gnrev.mlp" and again.metrics == ["gnrev.cka_to_init"]
    assert again.model_kwargs == {"hidden": [4, 4], "activation": "relu"}
    with pytest.raises(ValueError, match=r"unknown run spec keys \['lr'\]"):
        RunSpec.from_dict({**spec.to_dict(), "lr": 0.1})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        RunSpec(optimizer_kwargs={"betas": object()})
    with pytest.raises(ValueError, match="loss must be one of"):
        RunSpec(loss="hinge")
