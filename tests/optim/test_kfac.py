"""KFAC against a dense float64 Kronecker-factored solve that shares no code with it.

Oracle, per linear layer ``z = W̄ ā`` (``W̄ = [W, b]``, ``ā = [a; 1]``) of a 2-layer MLP written out by
hand: ``A = (1/N) Σ_n ā_n ā_nᵀ`` from the hand-written forward, ``G = Σ_n B_nᵀ (∇²_{F_n} L) B_n`` with
``B_n = ∂F_n/∂z_n`` by ``torch.func.jacrev`` and the loss Hessian by ``torch.func.hessian``; the step
``Δ vec W̄ = −η (torch.kron(G, A) + λI)⁻¹ vec ∇_{W̄} L`` by ``torch.linalg.solve`` (row-major ``vec``).
Tolerance: ``rtol = 1e-8`` in float64 (curvlinops inverts through eigendecompositions).
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import tanh_mlp_problem
from torch import nn
from torch.func import hessian, jacrev

from gnrev_plugin.optim import KFAC

LR, DAMPING = 0.7, 1e-2


def _problem(loss: str, n: int = 6, d: int = 4, h: int = 5, C: int = 3, seed: int = 0):
    return tanh_mlp_problem(n, loss, d, h, C, seed)


def _mean_loss(loss: str, F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "mse":
        return ((F - y) ** 2).mean()
    return -(F.log_softmax(1)[torch.arange(len(y)), y]).mean()


def dense_kronecker_factors(model, x, y, loss, kron_order="GA"):
    """The oracle's per-layer curvature ``kron(G, A)`` at the model's current parameters."""
    (W1, b1), (W2, b2) = [(m.weight.detach(), m.bias.detach()) for m in (model[0], model[2])]
    n = len(x)
    ones = torch.ones(n, 1, dtype=x.dtype)
    z1 = x @ W1.T + b1
    h1 = torch.tanh(z1)
    F = h1 @ W2.T + b2
    abar = [torch.cat([x, ones], 1), torch.cat([h1, ones], 1)]
    heads = [lambda z: torch.tanh(z) @ W2.T + b2, lambda z: z]      # F_n as a function of z_n
    zs = [z1, F]
    H = hessian(lambda out: _mean_loss(loss, out, y))(F)               # (n, C, n, C)
    kron = []
    for layer in range(2):
        A = abar[layer].T @ abar[layer] / n
        G = 0
        for i in range(n):
            B = jacrev(heads[layer])(zs[layer][i])                      # (C, out)
            G = G + B.T @ H[i, :, i, :] @ B
        kron.append(torch.kron(G, A) if kron_order == "GA" else torch.kron(A, G))
    return kron


def dense_gradient(model, x, y, loss):
    """``[vec ∇_{W̄₁} L, vec ∇_{W̄₂} L]`` (row-major) by ``torch.func.grad``."""
    (W1, b1), (W2, b2) = [(m.weight.detach(), m.bias.detach()) for m in (model[0], model[2])]

    def full_loss(W1_, b1_, W2_, b2_):
        return _mean_loss(loss, torch.tanh(x @ W1_.T + b1_) @ W2_.T + b2_, y)
    g = torch.func.grad(full_loss, argnums=(0, 1, 2, 3))(W1, b1, W2, b2)
    return [torch.cat([g[2 * k], g[2 * k + 1][:, None]], 1) for k in range(2)]


def dense_solve(kron, grads, lr=LR, damping=DAMPING):
    """``−η (K + λI)⁻¹ vec ∇L`` per layer, reshaped like ``W̄``."""
    return [(-lr * torch.linalg.solve(K + damping * torch.eye(len(K), dtype=K.dtype),
                                      g.reshape(-1))).reshape(g.shape)
            for K, g in zip(kron, grads, strict=True)]


def dense_kfac_step(model, x, y, loss, lr=LR, damping=DAMPING, kron_order="GA"):
    """The oracle: ``[ΔW̄₁, ΔW̄₂]`` from dense per-layer Kronecker solves."""
    return dense_solve(dense_kronecker_factors(model, x, y, loss, kron_order),
                       dense_gradient(model, x, y, loss), lr, damping)


def _taken_step(model, before):
    after = [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1) for m in (model[0], model[2])]
    return [a - b for a, b in zip(after, before, strict=True)]


def _snapshot(model):
    return [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1).clone()
            for m in (model[0], model[2])]


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_kfac_step_equals_dense_kronecker_solve(loss):
    model, x, y = _problem(loss)
    expected = dense_kfac_step(model, x, y, loss)
    before = _snapshot(model)
    opt = KFAC(model.parameters(), lr=LR, model=model, loss=loss, damping=DAMPING)
    opt.step_on_batch(x, y)
    for got, want in zip(_taken_step(model, before), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_kron_factor_order_matters():
    """The oracle tells the factor orders apart (so a swapped ``kron`` in either side fails)."""
    model, x, y = _problem("cross_entropy")
    ga = dense_kfac_step(model, x, y, "cross_entropy")
    ag = dense_kfac_step(model, x, y, "cross_entropy", kron_order="AG")
    assert max(float((a - b).abs().max()) for a, b in zip(ga, ag, strict=True)) > 1e-3


def test_drop_in_step_equals_step_on_batch():
    """``loss.backward(); opt.step()`` takes the same step as ``step_on_batch``."""
    model, x, y = _problem("cross_entropy")
    twin, _, _ = _problem("cross_entropy")
    opt = KFAC(model.parameters(), lr=LR, model=model, loss="cross_entropy", damping=DAMPING)
    opt_twin = KFAC(twin.parameters(), lr=LR, model=twin, loss="cross_entropy", damping=DAMPING)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    opt_twin.step_on_batch(x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_update_interval_reuses_the_factors():
    """With ``update_interval=2`` the second step uses the Kronecker factors of step 1 (built on
    ``(x, y)`` at ``θ₀``) with the gradient on ``(x₂, y)`` at ``θ₁``; the third recomputes them."""
    model, x, y = _problem("cross_entropy")
    x2 = x.flip(0) * 0.5
    opt = KFAC(model.parameters(), lr=LR, model=model, loss="cross_entropy", damping=DAMPING,
               update_interval=2)
    kron0 = dense_kronecker_factors(model, x, y, "cross_entropy")
    opt.step_on_batch(x, y)
    expected = dense_solve(kron0, dense_gradient(model, x2, y, "cross_entropy"))
    before = _snapshot(model)
    opt.step_on_batch(x2, y)
    for got, want in zip(_taken_step(model, before), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)
    expected = dense_kfac_step(model, x2, y, "cross_entropy")          # fresh factors at θ₂
    before = _snapshot(model)
    opt.step_on_batch(x2, y)
    for got, want in zip(_taken_step(model, before), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_missing_damping_is_rejected():
    model, _, _ = _problem("cross_entropy")
    with pytest.raises(ValueError, match="damping"):
        KFAC(model.parameters(), model=model, damping=0.0)


def test_kfac_trains_an_mlp():
    model, x, y = _problem("cross_entropy", n=32)
    opt = KFAC(model.parameters(), lr=0.5, model=model, loss="cross_entropy", damping=1e-2)
    losses = [float(opt.step_on_batch(x, y)) for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.cuda
def test_kfac_step_on_cuda_equals_cpu():
    """The same float64 step on CUDA and on the CPU (``rtol = 1e-8``)."""
    model, x, y = _problem("cross_entropy")
    twin = copy.deepcopy(model).cuda()
    KFAC(model.parameters(), lr=LR, model=model, damping=DAMPING).step_on_batch(x, y)
    KFAC(twin.parameters(), lr=LR, model=twin, damping=DAMPING).step_on_batch(x.cuda(), y.cuda())
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-8, atol=1e-11)
