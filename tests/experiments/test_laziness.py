"""``gnrev reproduce laziness``: the smoke preset end to end, the CSV, the report rebuilt from logs
alone, and the recorded laziness metrics against an independent dense float64 computation.

The oracle shares no code with the logged path: the logged ``ntk_sim`` comes from the structured
NTK (:func:`gnrev_plugin.metrics.revmlp_ntk`), ``ntk_sim_probe`` from VJP + JVP products
(:func:`gnrev_plugin.metrics.random_probe_similarity`) and ``cka_last`` from the Gram-matrix HSIC
(:mod:`gnrev_plugin.metrics.representation`); here the Jacobians are dense ``torch.func.jacrev``
matrices of float64 copies of the models, and CKA is the feature-space formula
``‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)`` in NumPy.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from realdata import REAL_MNIST, needs_real_mnist
from torch.func import functional_call, jacrev

from gnrev_plugin.build import RunSpec, build
from gnrev_plugin.engine.rundir import RunDir
from gnrev_plugin.experiments.catalog import EXPERIMENTS, build_report
from gnrev_plugin.experiments.laziness import init_std, laziness_configs, laziness_run_specs, run_laziness
from gnrev_plugin.experiments.laziness.report import CSV_COLUMNS
from gnrev_plugin.experiments.laziness.run import load_laziness_data
from gnrev_plugin.experiments.presets import get_preset

pytestmark = needs_real_mnist


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset on real MNIST, run once for the module."""
    out = tmp_path_factory.mktemp("laziness")
    preset = get_preset("laziness", "smoke")
    statuses = run_laziness(out, "smoke", data="mnist", data_dir=str(REAL_MNIST), progress=False)
    return out, preset, statuses


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_laziness_is_in_the_catalog():
    assert EXPERIMENTS["laziness"].run is run_laziness


def test_configs_are_one_factor_at_a_time_and_deduplicated():
    p = get_preset("laziness", "smoke")
    cfgs = laziness_configs(p)
    keys = [(c["optimizer"], c["step"], c["width"], c["init"], c["lr"]) for c in cfgs]
    assert len(keys) == len(set(keys))
    # width axis: 2 widths × (2 GN steps + Adam + SGD); α axis adds α = 0.5 for both GN steps;
    # init axis adds fan_in for all four methods
    assert len(cfgs) == 2 * 4 + 2 + 4
    base = [c for c in cfgs if c["optimizer"] == "exact_gn" and c["width"] == 32
            and c["init"] == "paper" and c["lr"] == 1.0]
    assert len(base) == 2 and all(c["axes"] == ["width", "alpha", "init"] for c in base)
    assert init_std("fan_in", 64) == pytest.approx(1 / 8) and init_std("paper", 64) == 1e-3
    with pytest.raises(ValueError, match="unknown init"):
        laziness_configs(dict(p, inits=["xavier"]))


def test_specs_carry_the_truncation_and_the_init(smoke):
    out, preset, _ = smoke
    specs = {name: (spec, extra) for name, spec, extra in laziness_run_specs(preset, "mnist")}
    for name, (spec, extra) in specs.items():
        cfg = json.loads((out / "runs" / name / RunDir.CONFIG).read_text())
        assert cfg["spec"] == spec.to_dict()          # what ran is what the sweep asked for
        kw = spec.optimizer_kwargs
        if extra["step"] == "truncated":
            assert (kw["solver"], kw["rtol"], kw["atol"]) == ("eigh", 1e-2, 1e-5)
        elif extra["step"] == "exact":
            assert kw.get("solver", "cholesky") == "cholesky" and "rtol" not in kw
        expect = 1e-3 if extra["init"] == "paper" else 1 / math.sqrt(extra["width"])
        assert spec.model_kwargs["init_std"] == pytest.approx(expect)


def test_csv_has_one_row_per_run_with_every_column(smoke):
    out, preset, statuses = smoke
    assert statuses and all(s["status"] == "ok" for s in statuses)
    rows = _csv(out / "laziness.csv")
    assert list(rows[0]) == CSV_COLUMNS
    n_runs = len(laziness_configs(preset)) * len(preset["seeds"])
    assert len(rows) == n_runs == len(statuses)
    for r in rows:
        for k in ("ntk_sim_probe", "ntk_alignment", "cka_last", "test_acc", "train_acc",
                  "wcos", "wnorm", "ntk_velocity"):
            assert math.isfinite(float(r[k])), (r["run"], k)
        assert int(r["epochs"]) == preset["epochs"]
        assert (r["exact_frac"] != "") == (r["optimizer"] == "exact_gn")
    # GN moved its NTK in these runs; the similarity is a cosine, so ≤ 1
    assert all(float(r["ntk_sim_probe"]) <= 1 + 1e-12 for r in rows)
    for name in ("report.md", "figures/similarity_vs_width.png",
                 "figures/similarity_over_training.png",
                 "figures/test_acc_exact_vs_truncated.png", "figures/alpha_and_init.png"):
        assert (out / name).exists(), name


def test_diagnostics_are_logged_every_few_epochs_and_at_the_last(smoke):
    out, preset, _ = smoke
    run = RunDir(next((out / "runs").rglob(RunDir.LOG)).parent)
    measured = [r["epoch"] for r in run.rows() if r.get("ntk_sim_probe") is not None]
    every, last = preset["every"], preset["epochs"]
    assert measured == sorted({e for e in range(last + 1) if e % every == 0} | {last})


def test_report_rebuilds_from_the_logs_alone(smoke, tmp_path):
    out, _, _ = smoke
    copy_ = tmp_path / "copy"
    shutil.copytree(out, copy_, ignore=shutil.ignore_patterns("checkpoint.pt", "*.png",
                                                              "report.md", "laziness.csv"))
    assert not list(copy_.rglob("checkpoint.pt"))
    build_report(copy_)
    assert (copy_ / "laziness.csv").read_text() == (out / "laziness.csv").read_text()
    report = (copy_ / "report.md").read_text()
    assert report == (out / "report.md").read_text()
    for claim in ("GN's NTK stays near init", "GN's representations stay near init",
                  "Wider ⇒ lazier", "The truncation improves test accuracy"):
        assert claim in report
    assert len(list((copy_ / "figures").glob("*.png"))) == 4


def test_truncation_verdicts_follow_the_csv(smoke):
    """The report's seed-paired verdict on each (M, init, α) matches the CSV's test accuracies."""
    out, _, _ = smoke
    rows = _csv(out / "laziness.csv")
    pairs = {}
    for r in rows:
        if r["optimizer"] == "exact_gn":
            pairs.setdefault((int(r["width"]), r["init"], float(r["lr"])), {}).setdefault(
                r["step"], []).append(float(r["test_acc"]))
    report = (out / "report.md").read_text()
    table = report.split("### Claim 4")[1].split("## Every configuration")[0]
    assert pairs
    for (M, init, lr), s in pairs.items():
        d = np.array(s["truncated"]) - np.array(s["exact"])
        want = ("improves (every seed)" if (d > 0).all() else
                "worsens (every seed)" if (d < 0).all() else "mixed")
        cells = next(c for c in ([x.strip() for x in line.strip("|").split("|")]
                                 for line in table.splitlines() if line.startswith("|"))
                     if c[0] == str(M) and c[1] == init and c[2] == f"{lr:g}")
        line = cells[-1]
        assert want in line, (M, init, lr, line)


# ------------------------------------------------------------------ independent recomputation
def _final_and_initial(out, name):
    """The run's model after its last epoch (from the checkpoint) and at init (rebuilt from the
    recorded spec and seed), both as float64 copies."""
    run = RunDir(out / "runs" / name)
    spec = RunSpec.from_dict(run.read_config()["spec"])
    ds = load_laziness_data(get_preset("laziness", "smoke"), "mnist", str(REAL_MNIST))
    built = build(spec, in_features=ds.in_features, num_classes=ds.num_classes)
    model0 = copy.deepcopy(built.model).double()
    built.model.load_state_dict(run.load_checkpoint()["model"])
    return model0, built.model.double(), ds.x_train[:spec.probe_size].double(), run.rows()[-1]


class _Output(torch.nn.Module):
    """``X ↦ vec F(X)``, the logits of a RevMLP."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(x).reshape(-1)


def _dense_jacobian(model, X) -> torch.Tensor:
    """The dense Jacobian ``∂ vec F / ∂θ`` (``torch.func.jacrev``) over all trained tensors."""
    wrap = _Output(model)
    params = {k: v.detach() for k, v in wrap.named_parameters() if v.requires_grad}
    jac = jacrev(lambda p: functional_call(wrap, p, (X,)))(params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)


def _kernel_times(model, X, v) -> torch.Tensor:
    """``K v = J (Jᵀ v)`` for the features ``X^(L)`` with plain autograd: ``g = Jᵀ v`` by one
    backward pass, then ``J g = ∂/∂u ⟨Jᵀ u, g⟩`` by a double backward (no ``torch.func``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model.features(X)
    g = torch.autograd.grad(out, params, grad_outputs=v, retain_graph=True)
    u = torch.zeros_like(out, requires_grad=True)
    jt_u = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True)
    inner = sum((a * b).sum() for a, b in zip(jt_u, g, strict=True))
    (jg,) = torch.autograd.grad(inner, u)
    return jg.reshape(-1)


def _cka_features(A: np.ndarray, B: np.ndarray) -> float:
    A = A - A.mean(0)
    B = B - B.mean(0)
    return float(np.linalg.norm(B.T @ A) ** 2
                 / (np.linalg.norm(A.T @ A) * np.linalg.norm(B.T @ B)))


@pytest.mark.parametrize("name", ["exact_gn-truncated/M32/paper/lr1/seed0",
                                  "exact_gn-exact/M16/paper/lr1/seed0",
                                  "sgd/M32/fan_in/lr0.1/seed0"])
def test_recorded_laziness_metrics_match_a_dense_float64_oracle(smoke, name):
    out, preset, _ = smoke
    model0, model, X, last = _final_and_initial(out, name)
    # full logit NTK Θ = J Jᵀ from dense Jacobians, Frobenius alignment with Θ₀
    J0, J = _dense_jacobian(model0, X), _dense_jacobian(model, X)
    K0, K = J0 @ J0.T, J @ J.T
    align = ((K0 * K).sum() / (K0.norm() * K.norm())).item()
    assert last["ntk_sim"] == pytest.approx(align, abs=2e-6)
    # the reference's probe: v̄ = mean of S standard-normal draws (generator seed 0) in the
    # space of the pre-readout features X^(L); cos(K₀ v̄, K_t v̄) with K v̄ by plain autograd
    shape = model.features(X).shape
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(preset["num_probes"], *shape, generator=gen, dtype=torch.float64).mean(0)
    a, b = _kernel_times(model0, X, v), _kernel_times(model, X, v)
    probe = (a @ b / (a.norm() * b.norm())).item()
    assert last["ntk_sim_probe"] == pytest.approx(probe, abs=2e-6)
    # CKA of the last half-layer's output [X1, X2] = X^(L) against init
    with torch.no_grad():
        cka = _cka_features(model0.features(X).numpy(), model.features(X).numpy())
    cka_key = max((k for k in last if k.startswith("cka/")),
                  key=lambda k: (int(k.split(".")[1]), k.split(".")[2]))
    assert cka_key == f"cka/blocks.{model.num_blocks - 1}.g"
    assert last[cka_key] == pytest.approx(cka, abs=2e-6)
    # and the CSV row carries the same numbers
    row = next(r for r in _csv(out / "laziness.csv") if r["run"] == name)
    assert float(row["ntk_alignment"]) == pytest.approx(align, abs=2e-6)
    assert float(row["ntk_sim_probe"]) == pytest.approx(probe, abs=2e-6)
    assert float(row["cka_last"]) == pytest.approx(cka, abs=2e-6)
    # a run that trained moved off init: the check above is not comparing two 1s
    assert align < 1 - 1e-4 or probe < 1 - 1e-4


def _summary(method_step, M, seed, test_acc):
    opt, _, step = method_step.partition("-")
    return dict(optimizer=opt, step=step or "-", width=M, init="paper", lr=1.0, seed=seed,
                test_acc=test_acc, train_loss=0.1, exact_frac=1.0, axes="width")


def test_truncation_verdict_is_seed_paired():
    """Constructed summaries: truncated better on both seeds, worse on both, and split."""
    from gnrev_plugin.experiments.laziness.report import _trunc_map

    table = []
    for M, (e0, t0, e1, t1) in {8: (0.5, 0.6, 0.4, 0.45), 16: (0.5, 0.4, 0.5, 0.45),
                                32: (0.5, 0.6, 0.5, 0.45)}.items():
        table += [_summary("exact_gn-exact", M, 0, e0), _summary("exact_gn-truncated", M, 0, t0),
                  _summary("exact_gn-exact", M, 1, e1), _summary("exact_gn-truncated", M, 1, t1)]
    text, lines = _trunc_map(table)
    verdict = {int(c[0]): c[-1] for c in ([x.strip() for x in line.strip("|").split("|")]
                                          for line in text.splitlines()[2:])}
    assert verdict == {8: "improves (every seed)", 16: "worsens (every seed)", 32: "mixed"}
    assert "improves on every seed at M=8 paper α=1;" in lines[0]


def test_width_trend_counts_small_steps_as_flat():
    from gnrev_plugin.experiments.laziness.report import FLAT, _trend

    def t(*mus):
        return _trend([(i, (m, 0.0, 1)) for i, m in enumerate(mus)])
    assert t(0.2, 0.3, 0.4).startswith("holds")
    assert t(0.4, 0.3, 0.2).startswith("reversed")
    assert t(0.2, 0.4, 0.3) == "mixed, up overall"
    assert t(0.5, 0.5 + FLAT / 2, 0.5).startswith("flat")
