"""Hessian-free against dense float64 Gauss-Newton oracles that share no code with it.

Oracle: ``J = ∂vec F/∂θ`` by ``torch.func.jacrev`` (``nC × P``), the loss Hessian ``H = ∇²_F L`` by
``torch.func.hessian``, ``G = Jᵀ H J``, ``g = ∇L`` by ``torch.func.grad``; the exact Gauss-Newton
step is the minimum-norm ``−η G⁺ g`` (``torch.linalg.pinv``), the damped one
``−η (G + λI)⁻¹ g`` (``torch.linalg.solve``). Tolerances are stated per test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from oracles import tanh_mlp_problem
from torch import nn
from torch.func import functional_call, hessian, jacrev

from gnrev_plugin.optim import HessianFree
from gnrev_plugin.optim.hessian_free import truncated_cg


def _problem(n: int, loss: str = "cross_entropy", d: int = 3, h: int = 4, C: int = 3, seed: int = 0):
    return tanh_mlp_problem(n, loss, d, h, C, seed)


def _mean_loss(loss, F, y):
    if loss == "mse":
        return ((F - y) ** 2).mean()
    return -(F.log_softmax(1)[torch.arange(len(y)), y]).mean()


def dense_ggn(model, x, y, loss="cross_entropy"):
    """``(G, g, θ)``: the dense GGN, the gradient and the flat parameters (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = v[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def F(v):
        return functional_call(model, unflat(v), (x,))
    out = F(theta)
    J = jacrev(lambda v: F(v).reshape(-1))(theta)                      # (nC, P)
    H = hessian(lambda o: _mean_loss(loss, o.reshape(out.shape), y))(out.reshape(-1))
    g = torch.func.grad(lambda v: _mean_loss(loss, F(v), y))(theta)
    return J.T @ H @ J, g, theta


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _exact_options(P):
    return dict(damping=0.0, adapt_damping=False, cg_warm_start=0.0, cg_max_iter=4 * P,
                cg_tol=1e-13, cg_progress_tol=0.0, reject_uphill=False)


@pytest.mark.parametrize(("loss", "n", "rank"), [("mse", 20, 31), ("cross_entropy", 20, 26),
                                                 ("cross_entropy", 3, 6)],
                         ids=["mse_full_rank", "ce_softmax_invariance", "ce_fewer_outputs"])
def test_hessian_free_equals_exact_gauss_newton_step(loss, n, rank):
    """``λ = 0`` and CG run to convergence: the step is ``−η G⁺ g`` (``rtol = 1e-6``, float64).
    Cross-entropy is invariant to a shift of all logits, so ``G`` loses the ``h + 1 = 5`` directions
    of the last layer that shift them (rank 26 of ``P = 31``); with ``n = 3``,
    ``rank G ≤ n(C−1) = 6``: both are minimum-norm solutions."""
    model, x, y = _problem(n, loss)
    G, g, theta = dense_ggn(model, x, y, loss)
    assert int(torch.linalg.matrix_rank(G)) == rank
    lr = 0.5
    expected = -lr * torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ g
    opt = HessianFree(model.parameters(), lr=lr, model=model, loss=loss,
                      **_exact_options(len(theta)))
    opt.step_on_batch(x, y)
    torch.testing.assert_close(_flat(model) - theta, expected, rtol=1e-6,
                               atol=1e-8 * float(expected.abs().max()))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_damped_step_and_levenberg_marquardt_rule(loss):
    """With ``λ = 0.3``: the step is ``−(G + λI)⁻¹ g`` (``rtol = 1e-7``) and the next ``λ`` follows
    ``ρ = (L(θ+s) − L(θ)) / (gᵀs + ½ sᵀGs)``: ``×3/2`` if ``ρ < 1/4``, ``×2/3`` if ``ρ > 3/4``."""
    model, x, y = _problem(12, loss)
    G, g, theta = dense_ggn(model, x, y, loss)
    lam = 0.3
    s = -torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), g)
    opt = HessianFree(model.parameters(), lr=1.0, model=model, loss=loss, damping=lam,
                      cg_warm_start=0.0, cg_max_iter=4 * len(theta), cg_tol=1e-13,
                      cg_progress_tol=0.0, reject_uphill=False)
    loss_before = float(opt.step_on_batch(x, y))
    torch.testing.assert_close(_flat(model) - theta, s, rtol=1e-7, atol=1e-10)
    loss_after = float(_mean_loss(loss, model(x), y))
    rho = (loss_after - loss_before) / float(g @ s + 0.5 * s @ G @ s)
    factor = 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)
    assert opt.param_groups[0]["damping"] == pytest.approx(lam * factor, rel=1e-12)
    assert opt.last_step_info["rho"] == pytest.approx(rho, rel=1e-6)


def test_uphill_step_is_undone_and_damping_grows():
    model, x, y = _problem(12)
    theta = _flat(model)
    opt = HessianFree(model.parameters(), lr=50.0, model=model, damping=1e-3, cg_warm_start=0.0)
    opt.step_on_batch(x, y)
    assert opt.last_step_info["rejected"]
    torch.testing.assert_close(_flat(model), theta, rtol=0, atol=0)
    assert opt.param_groups[0]["damping"] == pytest.approx(1.5e-3)


def test_drop_in_step_equals_step_on_batch():
    model, x, y = _problem(12)
    twin, _, _ = _problem(12)
    opt = HessianFree(model.parameters(), model=model, damping=0.5)
    opt_twin = HessianFree(twin.parameters(), model=twin, damping=0.5)
    for _ in range(2):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step()
        opt_twin.step_on_batch(x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preconditioner", ["none", "martens"])
def test_hessian_free_trains_an_mlp(preconditioner):
    model, x, y = _problem(32, h=8)
    opt = HessianFree(model.parameters(), model=model, damping=1.0, preconditioner=preconditioner)
    losses = [float(opt.step_on_batch(x, y)) for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0] and all(math.isfinite(v) for v in losses)


def test_martens_preconditioner_keeps_the_converged_solution():
    """A preconditioner changes CG's path, not its fixed point: at convergence the preconditioned
    damped step still equals ``−(G + λI)⁻¹ g`` (``rtol = 1e-6``)."""
    model, x, y = _problem(12)
    G, g, theta = dense_ggn(model, x, y)
    lam = 0.2
    s = -torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), g)
    opt = HessianFree(model.parameters(), model=model, damping=lam, cg_warm_start=0.0,
                      cg_max_iter=4 * len(theta), cg_tol=1e-13, cg_progress_tol=0.0, preconditioner="martens",
                      reject_uphill=False)
    opt.step_on_batch(x, y)
    torch.testing.assert_close(_flat(model) - theta, s, rtol=1e-6, atol=1e-9)


def test_truncated_cg_solves_an_spd_system_to_machine_precision():
    """Plain CG on a 31×31 SPD system (eigenvalues ``logspace(−0.5, 2)``) reaches ``1e-12`` of
    ``torch.linalg.solve`` within ``2n`` iterations; the progress rule stops it earlier."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(31, 31, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.logspace(-0.5, 2, 31, dtype=torch.float64)) @ Q.T
    b = torch.randn(31, generator=g, dtype=torch.float64)
    x, _ = truncated_cg(A.__matmul__, b, torch.zeros_like(b), 62, 0.0, progress_tol=0.0)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=0, atol=1e-12)
    _, iterations = truncated_cg(A.__matmul__, b, torch.zeros_like(b), 62, 0.0, progress_tol=5e-4)
    assert 10 < iterations < 62


@pytest.mark.cuda
def test_hessian_free_step_on_cuda_equals_cpu():
    """The same float64 step (and damping update) on CUDA and on the CPU (``rtol = 1e-7``)."""
    model, x, y = _problem(12)
    twin = copy.deepcopy(model).cuda()
    a = HessianFree(model.parameters(), model=model, damping=0.3, cg_warm_start=0.0)
    b = HessianFree(twin.parameters(), model=twin, damping=0.3, cg_warm_start=0.0)
    a.step_on_batch(x, y)
    b.step_on_batch(x.cuda(), y.cuda())
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-7, atol=1e-10)
    assert a.param_groups[0]["damping"] == pytest.approx(b.param_groups[0]["damping"])
