"""``gnrev reproduce sharpness`` on a tiny preset: every run built through the registry, the
logged curvature equal to dense oracles, the report's claims computed from the logs, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, hessian, jacrev

from gnrev_plugin.build import RunSpec, build
from gnrev_plugin.experiments.catalog import EXPERIMENTS, build_report
from gnrev_plugin.experiments.presets import get_preset
from gnrev_plugin.experiments.sharpness.report import paired, verdict
from gnrev_plugin.experiments.sharpness.run import load_split, run_sharpness, sharpness_configs
from gnrev_plugin.experiments.tables import collect_runs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = dict(
    datasets=["mnist1d"], num_train=48, num_test=16, input_dim=5, hidden=[4],
    activations=["relu", "gelu"], ablate=["gelu"],
    methods=["gnrev.sam", "gnrev.psam", "gnrev.weight_noise", "gnrev.hessian_trace_penalty",
             "gnrev.gn_trace_penalty"],
    rhos=[0.5], sigma2s=[0.01], samples=1, seeds=[0, 1], epochs=2, lr=0.5, batch_size=16,
    every=1, probe_size=8, curvature_seeds=[0],
    curvature_methods=["gnrev.sgd", "gnrev.hessian_trace_penalty", "gnrev.gn_trace_penalty"],
    exact_max_dim=2000, trace_matvecs=30,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharpness")
    statuses = run_sharpness(out, preset_name="tiny", preset=TINY, progress=False)
    return out, statuses


def test_every_configuration_runs_through_the_registry(tiny_run):
    out, statuses = tiny_run
    assert "sharpness" in EXPERIMENTS
    assert all(s["status"] == "ok" for s in statuses)
    runs = collect_runs(out)
    assert len(runs) == len(sharpness_configs(TINY)) * len(TINY["seeds"]) == 26
    for r in runs:
        spec = RunSpec.from_dict(r["config"]["spec"])
        assert spec == spec.resolve()  # recorded resolved
        assert spec.model == "gnrev.mlp" and spec.optimizer == r["config"]["method"]
        if spec.optimizer != "gnrev.sgd":
            assert spec.optimizer_kwargs["base"] == "gnrev.sgd"
            assert spec.optimizer_kwargs["ablate_nme"] == r["config"]["ablate"]
        assert r["rows"][-1]["epoch"] == TINY["epochs"] and r["result"]["diverged"] is None
    ablated = [r for r in runs if r["config"]["ablate"]]
    assert {r["config"]["method"] for r in ablated} == {"gnrev.psam"}


def test_logged_traces_equal_dense_oracles_of_the_initial_model(tiny_run):
    """``tr H`` (``torch.func.hessian``) and ``tr G = (1/n) Σ tr(J_nᵀ H_z J_n)`` (``jacrev``) of
    the initial GELU model on the probe inputs, rebuilt from the recorded spec."""
    out, _ = tiny_run
    run = next(r for r in collect_runs(out) if r["name"] == "mnist1d/gelu/sgd/seed0")
    row = run["rows"][0]
    spec = RunSpec.from_dict(run["config"]["spec"])
    Xtr, ytr, *_, C, _ = load_split("mnist1d", None, TINY["num_train"], TINY["num_test"],
                                    TINY["input_dim"])
    model = build(spec, in_features=Xtr.shape[1], num_classes=C).model
    X, y = Xtr[:TINY["probe_size"]], ytr[:TINY["probe_size"]]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    v0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(v):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, ps, (X,))

    def L(v):
        z = logits(v)
        return (torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]).mean()

    tr_h = float(torch.trace(hessian(L)(v0)))
    J = jacrev(logits)(v0)
    p = torch.softmax(logits(v0), 1)
    Hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    tr_g = float(torch.einsum("ncp,ncd,ndp->", J, Hz, J)) / len(X)
    assert row["curvature_mode"] == "exact"
    assert row["tr_hessian"] == pytest.approx(tr_h, rel=1e-9)
    assert row["tr_ggn"] == pytest.approx(tr_g, rel=1e-9)
    assert row["tr_nme"] == pytest.approx(tr_h - tr_g, rel=1e-6, abs=1e-12)
    relu = next(r for r in collect_runs(out) if r["name"] == "mnist1d/relu/sgd/seed0")
    assert all(abs(r["tr_nme"]) < 1e-10 * r["tr_hessian"] for r in relu["rows"])  # φ'' = 0


def test_report_states_each_claim_with_a_verdict_and_rebuilds_from_the_logs(tiny_run):
    out, _ = tiny_run
    text = (out / "report.md").read_text()
    for claim in ("PSAM drops with ReLU at large ρ", "β trend", "Ablating the activation NME",
                  "GN-trace penalty more stable"):
        assert claim in text
    assert text.count("→ **") >= 4
    for fig in ("rho", "sigma2", "curvature", "beta"):
        assert (out / "figures" / f"fig_sharpness_{fig}_mnist1d.png").stat().st_size > 0
    (out / "report.md").unlink()
    build_report(out)
    assert (out / "report.md").read_text() == text


def test_resume_skips_finished_runs(tiny_run):
    out, _ = tiny_run
    logs = sorted((out / "runs").rglob("log.jsonl"))
    before = {p: p.read_text() for p in logs}
    mtimes = {p: p.stat().st_mtime_ns for p in logs}
    statuses = run_sharpness(out, preset_name="tiny", preset=TINY, progress=False, resume=True)
    assert all(s["status"] == "ok" for s in statuses)
    assert {p: p.read_text() for p in logs} == before
    assert {p: p.stat().st_mtime_ns for p in logs} == mtimes


def test_presets_and_verdicts():
    quick = get_preset("sharpness", "quick")
    assert quick["seeds"] == [0, 1, 2] and set(quick["datasets"]) == {"mnist", "mnist1d"}
    assert any(a.startswith("beta_gelu:") for a in quick["activations"])
    a = {0: 0.90, 1: 0.91, 2: 0.92}
    b = {0: 0.80, 1: 0.82, 2: 0.81}
    d = paired(a, b)
    assert d[0] == pytest.approx(0.1) and d[2] == 3
    assert verdict(d, +1) == "holds" and verdict(d, -1) == "contradicted"
    assert verdict(paired(a, {0: 0.95, 1: 0.86, 2: 0.92}), +1) == "not resolved"
    assert verdict((0.1, math.nan, 1), +1).startswith("not resolved")
