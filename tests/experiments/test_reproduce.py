"""``gnrev reproduce`` / ``gnrev report``: smoke runs of every subcommand, exact resume, report
rebuilt from logs, crash-tolerant sweeps, clear data errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin.cli import main
from gnrev_plugin.defaults import RANK_POLICY
from gnrev_plugin.engine import Callback, Interrupted, runner
from gnrev_plugin.engine.rundir import read_jsonl
from gnrev_plugin.experiments.exact_gn import run_exact_gn

pytestmark = needs_real_mnist

PNG = b"\x89PNG\r\n\x1a\n"
TINY = dict(hidden=16, blocks=2, linear_first_block=True, seeds=[0], optimizers=["adam", "sgd"],
            probe_size=8, full_batch=dict(subset=16, epochs=1),
            mini_batch=dict(batch_size=16, epochs=1, train_size=32, test_size=32))


def _logs(out: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(out)): [{k: v for k, v in r.items() if k != "time_s"}
                                      for r in read_jsonl(p)]
            for p in sorted((out / "runs").rglob("log.jsonl"))}


@pytest.fixture(scope="module")
def exact_gn_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("egn") / "out"
    rc = main(["reproduce", "exact-gn", "--preset", "smoke", "--out", str(out),
               "--data-dir", str(REAL_MNIST), "--no-progress"])
    return rc, out


def test_exact_gn_smoke_writes_logs_figures_report(exact_gn_smoke):
    rc, out = exact_gn_smoke
    assert rc == 0
    logs = _logs(out)
    assert len(logs) == 6  # 2 settings × 3 optimizers × 1 seed
    for name, rows in logs.items():
        assert [r["epoch"] for r in rows] == [0, 1, 2], name
        last = rows[-1]
        for key in ("train_loss", "test_acc", "batch_loss_change_pct", "ntk_sim",
                    "cka/blocks.0.f", "cka/blocks.1.g", "wcos/__all__", "wnorm/__all__"):
            assert last.get(key) is not None, (name, key)
        assert rows[0]["ntk_sim"] == pytest.approx(1.0) and rows[0]["cka/blocks.1.g"] == \
            pytest.approx(1.0)
        assert (out / Path(name).parent / "result.json").exists()
        assert json.loads((out / Path(name).parent / "config.json").read_text())
    for setting in ("full_batch", "mini_batch"):      # each run records its resolved spec
        for opt, lr in (("exact_gn", 1.0 if setting == "full_batch" else 0.2), ("adam", 1e-4),
                        ("sgd", 0.1)):
            cfg = json.loads((out / f"runs/{setting}/{opt}/seed0/config.json").read_text())
            spec = cfg["spec"]
            assert (cfg["setting"], spec["model"], spec["optimizer"], spec["device"]) == \
                (setting, "gnrev.revmlp", f"gnrev.{opt}", "cpu")
            assert spec["optimizer_kwargs"]["lr"] == pytest.approx(lr)
            assert spec["model_kwargs"]["linear_first_block"] is True
    gn_spec = json.loads((out / "runs/mini_batch/exact_gn/seed0/config.json").read_text())["spec"]
    assert gn_spec["optimizer_kwargs"]["rank_policy"] == RANK_POLICY
    gn_fb = logs["runs/full_batch/exact_gn/seed0/log.jsonl"]
    assert gn_fb[-1]["train_loss"] < gn_fb[0]["train_loss"]
    figs = sorted((out / "figures").glob("*.png"))
    assert len(figs) == 6 and all(f.read_bytes()[:8] == PNG for f in figs)
    report = (out / "report.md").read_text()
    assert "Final numbers" in report and "| exact GN" in report and "fig4_ntk.png" in report
    assert "mini-batch exact GN 0.2, Adam 0.0001, SGD 0.1" in report
    assert f"GN rank policy: `{RANK_POLICY}`" in report
    assert all(r["status"] == "ok" for r in read_jsonl(out / "sweep.jsonl"))


def test_resume_after_interruption_gives_the_same_logs(exact_gn_smoke, tmp_path, monkeypatch):
    _, full = exact_gn_smoke
    out = tmp_path / "cut"
    calls = []

    class Crash(Callback):
        def on_checkpoint(self, state, row):
            calls.append(row["epoch"])
            if len(calls) == 5:  # the second run, after its epoch 1
                raise Interrupted("simulated kill")
    args = ["reproduce", "exact-gn", "--preset", "smoke", "--out", str(out), "--data-dir",
            str(REAL_MNIST), "--no-progress"]
    with pytest.raises(Interrupted):
        run_exact_gn(out, "smoke", data_dir=str(REAL_MNIST), progress=False,
                     callbacks=[Crash()])
    assert not (out / "report.md").exists()
    assert main([*args, "--resume"]) == 0
    assert _logs(out) == _logs(full)


def test_report_is_rebuilt_from_logs_alone(exact_gn_smoke, tmp_path):
    _, src = exact_gn_smoke
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    original = (out / "report.md").read_text()
    for ck in (out / "runs").rglob("checkpoint.pt"):
        ck.unlink()  # no model state needed
    (out / "report.md").unlink()
    shutil.rmtree(out / "figures")
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == original
    assert len(list((out / "figures").glob("*.png"))) == 6


def test_report_on_a_non_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_missing_data_dir_names_the_files(tmp_path, capsys):
    rc = main(["reproduce", "exact-gn", "--preset", "smoke", "--out", str(tmp_path / "o"),
               "--data-dir", str(tmp_path / "missing"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte.gz" in err and "t10k-labels-idx1-ubyte.gz" in err


def test_a_crashing_config_keeps_the_other_results(tmp_path, monkeypatch):
    real = runner.build

    def flaky(spec, **kw):
        if spec.optimizer == "gnrev.sgd":
            raise RuntimeError("injected failure")
        return real(spec, **kw)
    monkeypatch.setattr(runner, "build", flaky)
    statuses = run_exact_gn(tmp_path, "tiny", data_dir=str(REAL_MNIST), progress=False,
                            preset=TINY)
    by = {s["run"]: s["status"] for s in statuses}
    assert by == {"full_batch/adam/seed0": "ok", "full_batch/sgd/seed0": "failed",
                  "mini_batch/adam/seed0": "ok", "mini_batch/sgd/seed0": "failed"}
    assert (tmp_path / "runs/full_batch/adam/seed0/result.json").exists()
    assert "injected failure" in (tmp_path / "runs/mini_batch/sgd/seed0/error.txt").read_text()
    report = (tmp_path / "report.md").read_text()
    assert "Failed runs" in report and "injected failure" in report and "| Adam" in report


def test_exact_gn_accepts_mnist1d(tmp_path):
    statuses = run_exact_gn(tmp_path, "tiny", data="mnist1d", progress=False,
                            preset=dict(TINY, optimizers=["adam"]))
    assert all(s["status"] == "ok" for s in statuses)
    assert json.loads((tmp_path / "config.json").read_text())["data"] == "mnist1d"
    assert (tmp_path / "report.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_reaches_every_spec_and_a_missing_gpu_is_a_clear_error(tmp_path):
    statuses = run_exact_gn(tmp_path, "tiny", data_dir=str(REAL_MNIST), progress=False,
                            preset=dict(TINY, optimizers=["sgd"]), device="cuda")
    assert [s["status"] for s in statuses] == ["failed", "failed"]
    assert all("device 'cuda' requested, but torch.cuda.is_available() is False" in s["error"]
               for s in statuses)


def test_a_malformed_device_is_refused(tmp_path, capsys):
    assert main(["reproduce", "exact-gn", "--preset", "smoke", "--out", str(tmp_path / "o"),
                 "--device", "gpu", "--no-progress"]) == 2
    assert "--device 'gpu' is not a torch device" in capsys.readouterr().err
