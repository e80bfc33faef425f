"""``last_step_info["relative_residual"]`` is measured, not asserted (issue #12, item 4).

Oracle: the dense float64 ``rel(J Δθ, T) = ‖J Δθ − T‖/‖T‖`` with ``J`` from ``torch.func.jacrev``
(``oracles.dense_jacobian``), ``Δθ`` the parameter change the optimizer actually applied and
``T = −α ε``. Tolerance: the reported value equals the dense one to 1e-8 relative whenever it is
not round-off (> 1e-6); when the step is exact both are ≤ 1e-10.

A perturbed update (a wrong ``ΔW`` handed to the verification, the solver's own bookkeeping of
the achieved change left intact) must show up as a large residual: the check recomputes ``J Δθ``
from ``ΔW, Δb`` themselves.
"""

from __future__ import annotations

import pytest
import torch
from oracles import dense_jacobian, flat_params, rel

import gnrev_plugin.optim.right_inverse as ri
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN

DT = torch.float64


def make(L=2, M=16, lin=False, seed=0):
    return RevMLP(8, M, L, 3, activation="tanh", linear_first_block=lin, init_std=0.4,
                  seed=seed).double()


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)


def step_and_dense_residual(opt, model, x, y, alpha):
    J, F0 = dense_jacobian(model, x), model(x).detach()
    before = flat_params(model)
    opt.step_on_batch(x, y)
    T = -alpha * (F0 - y).reshape(-1)
    return opt.last_step_info["relative_residual"], rel(J @ (flat_params(model) - before), T)


@pytest.mark.parametrize("lin", [False, True])
def test_exact_step_reports_round_off(lin):
    model = make(L=3, lin=lin, seed=1)
    x, y = batch(7, 1)                       # lin: block 0 rank-deficient, redistributed
    opt = ExactGN(model.parameters(), lr=0.5, verify=True)
    reported, dense = step_and_dense_residual(opt, model, x, y, 0.5)
    assert dense <= 1e-10 and reported <= 1e-10
    assert opt.last_step_exact is True


@pytest.mark.parametrize("case", ["duplicated samples", "batch > M+1", "damped"])
def test_inexact_step_reports_the_dense_residual(case):
    seed = {"duplicated samples": 2, "batch > M+1": 3, "damped": 4}[case]
    model = make(L=2, M=4 if case == "batch > M+1" else 16, seed=seed)
    x, y = batch(8 if case == "batch > M+1" else 6, seed)
    kw = dict(rank_policy="warn")
    if case == "duplicated samples":
        x[5] = x[2]
    if case == "damped":
        kw.update(solver="damped", damping=0.5)
    opt = ExactGN(model.parameters(), lr=0.7, verify=True, **kw)
    with pytest.warns(RuntimeWarning, match="not exact"):
        reported, dense = step_and_dense_residual(opt, model, x, y, 0.7)
    assert dense > 1e-3                      # a real residual, not round-off
    assert reported == pytest.approx(dense, rel=1e-8)


def test_residual_is_none_without_verify():
    model = make(seed=5)
    x, y = batch(5, 5)
    opt = ExactGN(model.parameters(), lr=0.5)
    opt.step_on_batch(x, y)
    assert opt.last_step_info["relative_residual"] is None


class _Perturbed(ri.RightInverseResult):
    """Hands a wrong ΔW_f of block 0 to everything downstream (the verification and the
    optimizer), leaving the solver's own record of the achieved change as it was."""

    shift = 0.0
    where = "weight"

    def __init__(self, updates, *args, **kwargs):
        u = updates[min(updates)].f
        if self.where == "weight":
            u.weight.add_(self.shift * torch.ones_like(u.weight))
        else:
            u.achieved.add_(self.shift * torch.ones_like(u.achieved))
        super().__init__(updates, *args, **kwargs)


def test_perturbed_update_gives_a_large_reported_residual(monkeypatch):
    model = make(L=2, seed=6)
    x, y = batch(6, 6)
    monkeypatch.setattr(ri, "RightInverseResult", _Perturbed)
    monkeypatch.setattr(_Perturbed, "shift", 0.05)
    opt = ExactGN(model.parameters(), lr=0.5, verify=True)
    reported, dense = step_and_dense_residual(opt, model, x, y, 0.5)
    assert dense > 1e-2                      # the perturbation is visible in output space
    assert reported == pytest.approx(dense, rel=1e-8)


def test_residual_does_not_trust_the_solvers_bookkeeping(monkeypatch):
    """Corrupting only the achieved change the solver recorded leaves Δθ exact: the reported
    residual must stay round-off (it is recomputed from ΔW, Δb, not copied from the solver)."""
    model = make(L=2, seed=7)
    x, y = batch(6, 7)
    monkeypatch.setattr(ri, "RightInverseResult", _Perturbed)
    monkeypatch.setattr(_Perturbed, "shift", 0.05)
    monkeypatch.setattr(_Perturbed, "where", "achieved")
    opt = ExactGN(model.parameters(), lr=0.5, verify=True)
    reported, dense = step_and_dense_residual(opt, model, x, y, 0.5)
    assert dense <= 1e-10 and reported <= 1e-10
