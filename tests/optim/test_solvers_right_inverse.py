"""Behaviour of the solvers that no other test pinned down (mutation survivors of issue #12).

Each test fails on one or more named mutmut 3 mutants of ``optim/solvers/`` or
``optim/right_inverse.py`` (docs/testing.md, "Mutation testing"); every kill was checked by
applying the mutant by hand to a scratch copy of the package.

Oracles are dense, float64 and independent of the solvers: ``torch.linalg.pinv`` and
``torch.linalg.matrix_rank`` of the design matrix ``A = [S, 1]`` built from the features
themselves, the dense per-block oracle of ``test_exact_gn_dense_oracle.oracle_delta``
(``pinv`` of ``torch.func.jacrev`` block Jacobians). Tolerances: 1e-10 relative for float64
solutions against ``pinv`` (well-conditioned ``A``, ``κ(A) < 1e2``), 1e-8 relative for a whole
step against the dense oracle (as in ``test_exact_gn_dispatch.py``), 1e-5 relative for a float32
solution refined in float64 (a few float32 ulps of a well-conditioned solve); ranks exact.
"""

from __future__ import annotations

import re

import pytest
import torch
from oracles import rel
from test_exact_gn_dense_oracle import oracle_delta

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import RankDeficiencyError, exact_gn_direction
from gnrev_plugin.optim.right_inverse import right_inverse
from gnrev_plugin.optim.solvers import (
    HalfLayerSystem,
    SolverConfig,
    default_residual_rtol,
    factor_half_layer,
)

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def design(S):
    return torch.cat([S, torch.ones(S.shape[0], 1, dtype=S.dtype)], 1)


def pinv_solution(S, E):
    """``(ΔW, Δb)`` of the minimum-norm solution of ``[S, 1] Δ = E``, dense float64."""
    delta = torch.linalg.pinv(design(S.to(DT))) @ E.to(DT)
    return delta[:-1].mT, delta[-1]


def well_conditioned(n, M, seed, dtype=DT):
    S = torch.randn(n, M, generator=gen(seed), dtype=DT)
    s = torch.linalg.svdvals(design(S))
    assert float(s[0] / s[-1]) < 1e2                  # the stated tolerances rely on it
    return S.to(dtype)


# ------------------------------------------------------------------------ default_residual_rtol
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_rtol_of_a_dtype_outside_the_table_is_1e_2(dtype):
    """Kills ``default_residual_rtol__mutmut_4`` (no fallback: ``None``) and ``_5`` (1.01)."""
    assert default_residual_rtol(dtype) == 1e-2
    assert default_residual_rtol(torch.float64) == 1e-10
    assert default_residual_rtol(torch.float32) == 1e-3


# ------------------------------------------------------------------------ HalfLayerSystem.__init__
@pytest.mark.parametrize("features, linear, method", [
    (None, None, "cholesky"), (None, "factor", "svd")])
def test_missing_features_message(features, linear, method):
    """Kills ``HalfLayerSystem.__init____mutmut_10`` (the message text)."""
    from gnrev_plugin.optim.solvers import LinearFactor
    lin = None if linear is None else LinearFactor(torch.ones(3, 2, dtype=DT),
                                                   torch.eye(2, 4, dtype=DT))
    want = ("HalfLayerSystem needs the features S unless a linear factor is given (and the "
            "solver is not 'svd')")
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        HalfLayerSystem(features, SolverConfig(method), lin)


@pytest.mark.parametrize("dup", [False, True])
def test_svd_system_exact_flag_is_its_full_rank(dup):
    """``method='svd'``: ``exact`` is the bool ``rank == n`` (kills
    ``HalfLayerSystem.__init____mutmut_57``, ``exact = None``). Oracle: ``matrix_rank`` of the
    dense design matrix."""
    S = well_conditioned(5, 8, seed=1)
    if dup:
        S[4] = S[0]
    system = factor_half_layer(S, SolverConfig("svd"))
    rank = int(torch.linalg.matrix_rank(design(S)))
    assert rank == (4 if dup else 5)
    assert system.rank == rank
    assert system.exact is (not dup)
    assert system.full_rank is (not dup)


def test_constructed_directly_the_system_is_resolved():
    """``HalfLayerSystem(S, config)`` without ``defer`` factors and classifies at once
    (documented default ``defer=False``): rank and exactness are set, no flags are pending and
    a second ``resolve()`` changes nothing. Kills ``HalfLayerSystem.__init____mutmut_1``
    (``defer=True`` by default: no ``rank``), ``HalfLayerSystem.resolve__mutmut_10``
    (``pending = ""``: right_inverse's ``s.pending is not None`` filter would take a resolved
    system for a pending one) and ``GramSystem.resolve__mutmut_3`` (``_L = pending = ""``: a
    second resolve installs ``""`` as the Cholesky factor). Oracle: ``pinv`` of ``[S, 1]``,
    1e-10 relative."""
    S = well_conditioned(6, 9, seed=2)
    E = torch.randn(6, 3, generator=gen(3), dtype=DT)
    system = HalfLayerSystem(S, SolverConfig())
    assert system.pending is None
    assert system.rank == 6 and system.exact is True and system.gram_method == "cholesky"
    system.resolve()
    assert system.pending is None and system.rank == 6 and system.exact is True
    sol = system.solve(E)
    W, b = pinv_solution(S, E)
    assert rel(sol.weight, W) <= 1e-10 and rel(sol.bias, b) <= 1e-10


def test_float32_features_gram_formed_in_gram_dtype():
    """``gram_dtype=float64`` with float32 features: the Gram is formed from the features cast
    to float64 (kills ``HalfLayerSystem.__init____mutmut_84``, ``core.to(None)``: the Gram formed
    in float32). The features are multiples of 2⁻¹⁰ below 4 (exact in float32; their products
    need up to 44 bits) and row 5 = row 0 + row 1 − row 2 exactly, so ``A = [S, 1]`` has rank 5 exactly.
    In float64 the Gram is exactly singular and found rank 5; formed in float32 its rounding
    (≈ 1e-7 relative) lifts the zero eigenvalue far above the float64 rank floor (≈ 1e-14)."""
    g = gen(4)
    S = torch.randint(-2 ** 12, 2 ** 12, (6, 12), generator=g).to(DT) / 2 ** 10
    S[5] = S[0] + S[1] - S[2]              # coefficients 1, 1, −1, −1 sum to 0: [S, 1] too
    assert float((S.to(torch.float32).to(DT) - S).abs().max()) == 0.0
    rank = int(torch.linalg.matrix_rank(design(S)))
    assert rank == 5
    system = factor_half_layer(S.to(torch.float32), SolverConfig(gram_dtype=torch.float64))
    assert system.rank == rank and system.full_rank is False and system.exact is False


# ------------------------------------------------------------------------ HalfLayerSystem.solve
def test_svd_solve_expands_the_thin_target():
    """``solve(factors=(Z, R))`` with ``method='svd'`` solves ``E = Z R`` (kills
    ``HalfLayerSystem.solve__mutmut_8``, ``R`` ignored). Oracle: ``pinv([S, 1]) Z R``, 1e-10."""
    S = well_conditioned(6, 9, seed=5)
    g = gen(6)
    Z, R = torch.randn(6, 2, generator=g, dtype=DT), torch.randn(2, 5, generator=g, dtype=DT)
    sol = factor_half_layer(S, SolverConfig("svd")).solve(factors=(Z, R))
    W, b = pinv_solution(S, Z @ R)
    assert sol.weight.shape == (5, 9) and sol.bias.shape == (5,)
    assert rel(sol.weight, W) <= 1e-10 and rel(sol.bias, b) <= 1e-10
    assert rel(sol.achieved, Z @ R) <= 1e-10


# ------------------------------------------------------------------------ HalfLayerSystem.refine
@pytest.mark.parametrize("n, M", [(6, 12), (14, 5)])          # dual and primal side
def test_refined_float32_step_stays_float32_and_is_accurate(n, M):
    """A float32 system refined in float64: the refined ``ΔW``, ``Δb`` and achieved change are
    float32 and equal the float64 ``pinv`` solution to 1e-5 relative (kills
    ``HalfLayerSystem.refine__mutmut_7``, the residual's core not cast to float64, and
    ``refine__mutmut_60``, the refined bias left in float64)."""
    S32 = well_conditioned(n, M, seed=7, dtype=torch.float32)
    E = torch.randn(n, 3, generator=gen(8), dtype=DT)
    system = factor_half_layer(S32, SolverConfig())
    sol = system.solve(E.to(torch.float32))
    out = system.refine(sol)
    assert out.refined is True
    assert out.weight.dtype == out.bias.dtype == out.achieved.dtype == torch.float32
    W, b = pinv_solution(S32, E)
    assert rel(out.weight.to(DT), W) <= 1e-5 and rel(out.bias.to(DT), b) <= 1e-5
    want = design(S32.to(DT)) @ torch.linalg.pinv(design(S32.to(DT))) @ E
    assert rel(out.achieved.to(DT), want) <= 1e-5


# ------------------------------------------------------------------------ _BlockSystems
def test_linear_block_without_inputs_factors_through_h():
    """A linear first block with activations from ``features_with_activations`` and no
    ``inputs``: the factor is ``h Q_Cᵀ`` (kills ``_BlockSystems.__init____mutmut_55``). Oracle:
    the dense per-block ``pinv`` step, 1e-8 relative."""
    m = RevMLP(8, 16, 2, 3, activation="tanh", linear_first_block=True, init_std=0.4,
               seed=9).double()
    g = gen(9)
    x, T = torch.randn(4, 8, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)
    want, full = oracle_delta(m, x, T)
    assert full == [True, True]
    with torch.no_grad():
        acts = m.features_with_activations(x)[1]
        res = right_inverse(m, acts, T, SolverConfig())
    assert res.blocks[0].kind_f.startswith("linear")        # the linear factor was used
    got = torch.cat([t.reshape(-1) for i in range(2) for t in res.updates[i].tensors()])
    assert rel(got, want) <= 1e-8 and res.exact is True


# ------------------------------------------------------------------------ right_inverse messages
def _model_and_batch(M, n, seed):
    m = RevMLP(8, M, 2, 3, activation="tanh", init_std=0.4, seed=seed).double()
    g = gen(seed)
    return m, torch.randn(n, 8, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)


TAIL = ("), so J Δθ = target has no exact per-block solution. Use a batch ≤ M+1 without "
        "duplicated samples, or rank_policy='warn' to take the least-squares step")


def test_no_exact_block_message():
    """Every block rank-deficient (n = 8 > M+1 = 5): kills ``right_inverse__mutmut_127/128``."""
    m, x, T = _model_and_batch(4, 8, seed=10)
    desc = r"block 0: rank\(A_f\)=5, rank\(A_g\)=5 of n=8; block 1: rank\(A_f\)=5, " \
           r"rank\(A_g\)=5 of n=8"
    with pytest.raises(RankDeficiencyError,
                       match="^" + re.escape("no block can reproduce the target exactly (")
                       + desc + re.escape(TAIL) + "$"):
        exact_gn_direction(m, x, T)


NUM = r"\d\.\de[+-]\d\d"


def test_demoted_blocks_message():
    """Full-rank blocks that miss an unreachable ``residual_rtol`` even refined are demoted;
    with none left the error names them (kills ``right_inverse__mutmut_122``)."""
    m, x, T = _model_and_batch(16, 5, seed=11)
    part = [rf"block {i}: relative residuals {NUM} / {NUM} > 1e-300 after refinement "
            r"\(numerically rank-deficient Gram\)" for i in (0, 1)]
    with pytest.raises(RankDeficiencyError,
                       match="^" + re.escape("no block can reproduce the target exactly (")
                       + "; ".join(part) + re.escape(TAIL) + "$"):
        exact_gn_direction(m, x, T, residual_rtol=1e-300)


def test_strict_inaccurate_message():
    """``rank_policy='strict'``: inaccurate full-rank blocks are listed, ``"; "``-separated
    (kills ``right_inverse__mutmut_254``)."""
    m, x, T = _model_and_batch(16, 5, seed=11)
    part = [rf"block {i}: relative residuals {NUM} / {NUM} > 1e-300 after refinement"
            for i in (0, 1)]
    with pytest.raises(RankDeficiencyError,
                       match="^numerically rank-deficient Gauss-Newton systems: "
                       + "; ".join(part) + "$"):
        exact_gn_direction(m, x, T, rank_policy="strict", residual_rtol=1e-300)
