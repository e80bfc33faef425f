"""The blocked Gram products of the half-layer solvers against NumPy (mutation testing found
these paths unreached: they start at ``n ≥ 2·block_rows`` = 512 rows, beyond every other test).

Small block sizes push small matrices through the blocked loops. Oracle: ``S Sᵀ + 11ᵀ`` and
``[[SᵀS, Sᵀ1], [1ᵀS, n]]`` in NumPy float64; ``_dual_gram_lower`` and ``primal_gram_with_ones``
guarantee only the lower triangle (what Cholesky reads), so only that is compared. Tolerance
1e-13 relative (float64) or float32 round-off for a float32 Gram dtype.
"""

import numpy as np
import pytest
import torch

from gnrev_plugin.optim import solvers

DT = torch.float64


def features(n, m, seed, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g, dtype=dtype)


def dual_oracle(S):
    s = S.double().numpy()
    return s @ s.T + 1.0


def primal_oracle(S):
    s = S.double().numpy()
    b = np.concatenate([s, np.ones((s.shape[0], 1))], 1)
    return b.T @ b


@pytest.mark.parametrize("n,block", [(7, 3), (9, 3), (12, 4), (5, 3)])
def test_gram_with_ones_blocked_and_symmetric(n, block):
    S = features(n, 5, seed=n)
    K = solvers.gram_with_ones(S, block_rows=block)
    np.testing.assert_allclose(K.numpy(), dual_oracle(S), rtol=1e-13, atol=1e-13)
    assert torch.equal(K, K.mT)


@pytest.mark.parametrize("n,block", [(7, 3), (10, 4), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dual_gram_lower_triangle(n, block, dtype):
    S = features(n, 6, seed=2 * n)
    K = solvers._dual_gram_lower(S, dtype, block_rows=block)
    assert K.shape == (n, n) and K.dtype == dtype
    low = np.tril_indices(n)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(K.double().numpy()[low], dual_oracle(S)[low], rtol=tol, atol=tol)


@pytest.mark.parametrize("m,block", [(7, 3), (10, 4), (5, 3)])
def test_primal_gram_lower_triangle_and_border(m, block):
    S = features(4, m, seed=3 * m)
    G = solvers.primal_gram_with_ones(S, DT, block_cols=block)
    assert G.shape == (m + 1, m + 1)
    want = primal_oracle(S)
    low = np.tril_indices(m + 1)
    np.testing.assert_allclose(G.numpy()[low], want[low], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(G.numpy()[-1], want[-1], rtol=1e-13, atol=1e-13)   # full border
    np.testing.assert_allclose(G.numpy()[:, -1], want[:, -1], rtol=1e-13, atol=1e-13)


def test_solver_config_rank_rtol_bounds_and_factor_dtype():
    """``rank_rtol`` in [0, 1): 0 (keep every positive eigenvalue) is valid, 1 is not; a missing
    factor dtype is refused with the documented text."""
    assert solvers.SolverConfig("eigh", rank_rtol=0.0).rank_rtol == 0.0
    for bad in (1.0, -1e-3):
        with pytest.raises(ValueError, match=r"^rank_rtol must be in \[0, 1\), got "):
            solvers.SolverConfig("eigh", rank_rtol=bad)
    with pytest.raises(ValueError, match="^factor_dtype must be a real floating torch.dtype, "
                                        "got None$"):
        solvers.SolverConfig(factor_dtype=None)
