"""Randomised estimators on the gnrev operators, against dense values within their own variance
(issue #12, item 9).

Dense oracles come from ``torch.func`` (``jacrev``/``hessian``), never from the operators:
``Θ = J Jᵀ`` and ``NME = H − G``. Tolerances are set by each estimator's exact variance:

* ``hutchinson_diag`` (Rademacher ``v``, ``m`` probes): ``d̂_i = (1/m) Σ v_i (A v)_i`` has mean
  ``A_ii`` and variance ``Σ_{j≠i} A_ij² / m``; every entry must lie within 5 standard deviations
  and the summed squared error within 4× its expectation ``Σ_i Σ_{j≠i} A_ij² / m``.
* Lanczos spectral density (Papyan 2020, curvlinops' ``lanczos_approximate_spectrum``): for a
  start vector ``v`` uniform on the sphere, the quadrature's first two moments are exactly
  ``vᵀAv`` and ``vᵀA²v``; ``E[vᵀBv] = tr(B)/D`` and ``Var = 2/(D+2)·(tr(B²)/D − (tr B/D)²)``.
  The density's mean and (bump-corrected) second moment must be within 5 standard deviations
  of ``tr(A)/D`` and ``tr(A²)/D``, and its mass 1 (1e-6).
* ``estimate_trace`` (Hutchinson): within 5 sd, ``Var = 2(‖A‖_F² − Σ A_ii²)/m``; Hutch++
  (``m/3`` probes on the deflated remainder, ``Var ≤ 2‖A‖_F²/(m/3)``) within 5 sd of that bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from curvlinops import hutchinson_diag, lanczos_approximate_spectrum
from torch import nn
from torch.func import functional_call, hessian, jacrev

from gnrev_plugin.hosts.curvlinops import NMELinearOperator, NTKLinearOperator
from gnrev_plugin.metrics.hessian import estimate_trace
from gnrev_plugin.nn import RevMLP

F64 = torch.float64


def problem(seed=7, n=4):
    torch.manual_seed(seed)
    model = RevMLP(6, 7, 2, 3, activation="tanh", linear_first_block=False, init_std=0.5,
                   seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def dense_ntk(model, X):
    names = [k for k, _ in model.named_parameters()]
    ps = tuple(p.detach() for p in model.parameters())
    jac = jacrev(lambda *q: functional_call(model, dict(zip(names, q, strict=True)), (X,))
                 .reshape(-1), argnums=tuple(range(len(ps))))(*ps)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)
    return J @ J.T


def dense_nme(model, X, y, lossf):
    """H − G: torch.func.hessian of the flat loss minus Jᵀ ∇²_F L J."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(t):
        ps = dict(zip(names, (s.reshape(sh) for s, sh in zip(t.split(sizes), shapes,
                                                              strict=True)), strict=True))
        return functional_call(model, ps, (X,))

    H = hessian(lambda t: lossf(out(t), y))(theta)
    F0 = out(theta)
    J = jacrev(lambda t: out(t).reshape(-1))(theta)
    HF = hessian(lambda o: lossf(o.reshape(F0.shape), y))(F0.reshape(-1))
    return H - J.T @ HF @ J


def operator_and_dense(which):
    model, X, y = problem()
    params = list(model.parameters())
    if which == "ntk":
        return NTKLinearOperator(model, params, X), dense_ntk(model, X)
    lossf = nn.CrossEntropyLoss()
    return NMELinearOperator(model, lossf, params, [(X, y)]), dense_nme(model, X, y, lossf)


@pytest.mark.parametrize("which", ["ntk", "nme"])
def test_hutchinson_diag_within_its_variance(which):
    op, A = operator_and_dense(which)
    D = A.shape[0]
    m = min(D - 1, 60)
    torch.manual_seed(1)
    est = hutchinson_diag(op, num_matvecs=m)
    off2 = A.pow(2).sum(1) - A.diag().pow(2)                  # Σ_{j≠i} A_ij²
    sd = (off2 / m).sqrt()
    err = est - A.diag()
    assert bool((err.abs() <= 5 * sd + 1e-12).all()), float((err.abs() / sd).max())
    assert float(err.pow(2).sum()) <= 4 * float(off2.sum() / m)


def _moment_sd(B: torch.Tensor, repeats: int) -> tuple[float, float]:
    D = B.shape[0]
    t1, t2 = B.trace().item() / D, (B @ B).trace().item() / D
    return t1, math.sqrt(2.0 / (D + 2) * max(t2 - t1 * t1, 0.0) / repeats)


@pytest.mark.parametrize("which", ["ntk", "nme"])
def test_lanczos_spectral_density_moments_within_their_variance(which):
    op, A = operator_and_dense(which)
    D = A.shape[0]
    ev = torch.linalg.eigvalsh(A)
    lo, hi = ev[0].item(), ev[-1].item()
    ncv, kappa, repeats = min(D - 1, 10), 3.0, 8
    torch.manual_seed(2)
    # a wide margin keeps every Gaussian bump inside the grid, so moments are not truncated
    grid, dens = lanczos_approximate_spectrum(op, ncv, num_points=4096, num_repeats=repeats,
                                              kappa=kappa, boundaries=(lo, hi), margin=1.0)
    assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=1e-6)
    mean = torch.trapezoid(grid * dens, grid).item()
    want1, sd1 = _moment_sd(A, repeats)
    assert abs(mean - want1) <= 5 * sd1 + 1e-12 * abs(hi - lo)
    # second moment: Σ w θ² = vᵀA²v, plus the variance of each bump (curvlinops' width rule)
    half_width = (hi - lo) * (1 + 2 * 1.0) / 2
    bump = 2 / (ncv - 1) / math.sqrt(8 * math.log(kappa)) * half_width
    second = torch.trapezoid(grid**2 * dens, grid).item() - bump**2
    want2, sd2 = _moment_sd(A @ A, repeats)                   # tr(A²)/D and its sd
    assert abs(second - want2) <= 5 * sd2 + 1e-9 * max(abs(lo), abs(hi)) ** 2


@pytest.mark.parametrize("which", ["ntk", "nme"])
def test_estimate_trace_within_its_variance(which):
    op, A = operator_and_dense(which)
    D = A.shape[0]
    fro2, diag2 = A.pow(2).sum().item(), A.diag().pow(2).sum().item()
    val, m = estimate_trace(op, "hutchinson", num_matvecs=60, seed=3)
    assert m == min(60, D - 1)
    assert abs(val - A.trace().item()) <= 5 * math.sqrt(2 * (fro2 - diag2) / m)
    val, m = estimate_trace(op, "hutchpp", num_matvecs=60, seed=4)
    assert m % 3 == 0 and m <= min(60, D - 1)
    assert abs(val - A.trace().item()) <= 5 * math.sqrt(2 * fro2 / (m // 3))
