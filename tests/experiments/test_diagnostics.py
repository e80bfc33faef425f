"""Wiring of the per-epoch laziness diagnostics against the metrics they wrap."""

import pytest
import torch

from gnrev_plugin import metrics
from gnrev_plugin.experiments.diagnostics import RevMLPDiagnostics
from gnrev_plugin.nn import RevMLP


def _pair(seed=0):
    init = RevMLP(8, 12, 2, 3, linear_first_block=False, init_std=0.3, seed=seed).double()
    model = RevMLP(8, 12, 2, 3, linear_first_block=False, init_std=0.3, seed=seed).double()
    return init, model


def test_diagnostics_at_init_are_trivial():
    init, model = _pair()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    row = RevMLPDiagnostics(init, x).measure(model, 0)
    assert row["ntk_sim"] == pytest.approx(1.0, abs=1e-12) and row["ntk_velocity"] is None
    assert all(row[k] == pytest.approx(1.0, abs=1e-12) for k in row if k.startswith("cka/"))
    assert [k for k in row if k.startswith("cka/")] == ["cka/blocks.0.f", "cka/blocks.0.g",
                                                         "cka/blocks.1.f", "cka/blocks.1.g"]
    assert row["wcos/__all__"] == pytest.approx(1.0) and row["wnorm/__all__"] == pytest.approx(1.0)


def test_diagnostics_match_the_metrics_after_a_change_and_resume_state():
    init, model = _pair(2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    diag = RevMLPDiagnostics(init, x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    row = diag.measure(model, 1)
    K0, K1 = metrics.revmlp_ntk(init, x), metrics.revmlp_ntk(model, x)
    assert row["ntk_sim"] == pytest.approx(metrics.ntk_similarity(K0, K1), rel=1e-12)
    assert row["ntk_velocity"] == pytest.approx(1 - row["ntk_sim"], rel=1e-9, abs=1e-15)
    assert row["ntk_sim"] < 1
    reps0 = metrics.revmlp_representations(init, x)
    reps1 = metrics.revmlp_representations(model, x)
    assert row["cka/blocks.1.g"] == pytest.approx(metrics.linear_cka(reps0["blocks.1.g"],
                                                                     reps1["blocks.1.g"]))
    # the velocity of the next epoch is measured from the state handed over on resume
    fresh = RevMLPDiagnostics(init, x)
    fresh.load_state_dict(diag.state_dict())
    again = fresh.measure(model, 2)
    assert again["ntk_velocity"] == pytest.approx(0.0, abs=1e-12)
