"""``gnrev reproduce conditioning`` and ``gnrev reproduce nme``: smoke runs whose logs satisfy
the theory (bounds hold, tr(H) = tr(G) + tr(NME), tr(NME) = 0 for ReLU)."""

import json

import pytest
from realdata import REAL_MNIST, needs_real_mnist

from gnrev_plugin.cli import main
from gnrev_plugin.engine.rundir import read_jsonl
from gnrev_plugin.experiments.conditioning.report import KAPPA

pytestmark = needs_real_mnist


def test_conditioning_smoke(tmp_path):
    out = tmp_path / "cond"
    assert main(["reproduce", "conditioning", "--preset", "smoke", "--out", str(out),
                 "--data-dir", str(REAL_MNIST), "--no-progress"]) == 0
    rows = read_jsonl(out / "runs/depth_width/seed0/log.jsonl")
    assert rows and all(r["kappa"] >= 1 for r in rows)
    # the convex-combination bound holds (whitened data, hidden widths ≥ max(d, k))
    assert all(r["kappa"] <= r["bound_convex"] * (1 + 1e-9) for r in rows)
    assert all(r["bound_convex"] <= r["bound_loose"] * (1 + 1e-9) for r in rows)
    res = read_jsonl(out / "runs/residual/seed0/log.jsonl")
    assert [r["beta"] for r in res] == [0.0, 1.0]
    trn = read_jsonl(out / "runs/training/width8/seed0/log.jsonl")
    assert [r["epoch"] for r in trn] == [0, 2, 4] and all(r[KAPPA] >= 1 for r in trn)
    assert trn[-1]["train_loss"] < trn[0]["train_loss"]
    spec = json.loads((out / "runs/training/width8/seed0/config.json").read_text())["spec"]
    assert (spec["model"], spec["optimizer"], spec["loss"]) == ("gnrev.mlp", "gnrev.sgd", "mse")
    assert spec["model_kwargs"]["hidden"] == [8] and spec["model_kwargs"]["bias"] is True
    assert spec["optimizer_kwargs"]["lr"] == pytest.approx(0.1 * 10 / 2)  # η·C/2, MNIST C = 10
    report = (out / "report.md").read_text()
    assert "κ(G)" in report
    assert len(list((out / "figures").glob("*.png"))) == 3
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from the logs alone
    assert (out / "report.md").read_text() == report


def test_nme_smoke(tmp_path):
    out = tmp_path / "nme"
    assert main(["reproduce", "nme", "--preset", "smoke", "--out", str(out), "--data-dir",
                 str(REAL_MNIST), "--no-progress"]) == 0
    spec = json.loads((out / "runs/gelu/seed0/config.json").read_text())["spec"]
    assert (spec["model"], spec["optimizer"], spec["model_kwargs"]["activation"]) == \
        ("gnrev.mlp", "gnrev.sgd", "gelu")
    relu = read_jsonl(out / "runs/relu/seed0/log.jsonl")
    gelu = read_jsonl(out / "runs/gelu/seed0/log.jsonl")
    assert [r["epoch"] for r in relu] == [0, 1, 2]
    for r in relu + gelu:
        assert r["mode"] == "exact"
        assert r["tr_hessian"] == pytest.approx(r["tr_ggn"] + r["tr_nme"], rel=1e-9, abs=1e-12)
        assert r["nme_eig_min"] < 0 < r["nme_eig_max"]  # the NME is indefinite
    assert all(abs(r["tr_nme"]) < 1e-12 for r in relu)  # φ'' = 0: tr(NME) = 0 for ReLU
    assert any(abs(r["tr_nme"]) > 1e-6 for r in gelu)
    report = (out / "report.md").read_text()
    assert "tr(NME)" in report
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report
