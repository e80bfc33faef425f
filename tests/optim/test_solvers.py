"""Half-layer solvers against dense float64 oracles (``torch.linalg.pinv`` of ``A = [S, 1]``)."""

import pytest
import torch

from gnrev_plugin.optim.solvers import SolverConfig, factor_half_layer, gram_with_ones


@pytest.mark.parametrize("n", [7, 600, 1031])
def test_blocked_gram_is_the_exact_symmetric_gram(n):
    S = torch.randn(n, 40, dtype=torch.float64)
    K = gram_with_ones(S, block_rows=256)
    assert torch.equal(K, K.mT)
    assert torch.allclose(K, S @ S.mT + 1, rtol=0, atol=1e-11)


@pytest.mark.parametrize("method", ["cholesky", "eigh", "svd"])
def test_full_rank_solution_is_pinv(method):
    torch.manual_seed(0)
    S, E = torch.randn(6, 15, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    A = torch.cat([S, torch.ones(6, 1, dtype=torch.float64)], 1)
    sol = factor_half_layer(S, SolverConfig(method)).solve(E)
    delta = torch.linalg.pinv(A) @ E
    assert torch.allclose(sol.weight, delta[:-1].mT, atol=1e-12)
    assert torch.allclose(sol.bias, delta[-1], atol=1e-12)
    assert torch.allclose(sol.achieved, E, atol=1e-12)


@pytest.mark.parametrize("method", ["cholesky", "eigh", "svd"])
def test_rank_deficient_system_gives_least_squares_and_reports_rank(method):
    torch.manual_seed(1)
    S = torch.randn(4, 15, dtype=torch.float64)
    S = torch.cat([S, S[:2]])                         # duplicated rows: rank 4 of 6
    E = torch.randn(6, 3, dtype=torch.float64)
    A = torch.cat([S, torch.ones(6, 1, dtype=torch.float64)], 1)
    system = factor_half_layer(S, SolverConfig(method))
    assert system.rank == 4 and not system.full_rank and not system.exact
    sol = system.solve(E)
    delta = torch.linalg.pinv(A) @ E
    assert torch.allclose(sol.weight, delta[:-1].mT, atol=1e-9)
    assert torch.allclose(sol.achieved, A @ delta, atol=1e-9)


def test_damped_solution_formula():
    S, E = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    A = torch.cat([S, torch.ones(5, 1, dtype=torch.float64)], 1)
    sol = factor_half_layer(S, SolverConfig("damped", damping=0.3)).solve(E)
    expect = A.mT @ torch.linalg.solve(A @ A.mT + 0.3 * torch.eye(5, dtype=torch.float64), E)
    assert torch.allclose(sol.weight, expect[:-1].mT, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="qr"), "unknown solver"), (dict(method="damped"), "damping > 0"),
    (dict(rtol=-1.0), "rtol"), (dict(rank_rtol=2.0), "rank_rtol"),
])
def test_bad_solver_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverConfig(**kwargs)
