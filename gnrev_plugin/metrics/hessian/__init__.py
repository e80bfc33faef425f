r"""Hessian = Gauss-Newton + NME, on curvlinops 3.0.1 operators.

For an empirical risk ``L(θ) = c Σ_n ℓ(z_n(θ), y_n)`` (``c = 1/N`` for ``reduction='mean'``, ``c = 1``
for ``'sum'``; curvlinops differentiates the ``loss_fn`` exactly as given) with logits
``z_n = f(θ, x_n) ∈ R^C``, per-sample Jacobians ``J_n = ∂z_n/∂θ`` and ``H_{z,n} = ∇²_z ℓ_n``:

    H   = ∇²_θ L = G + NME
    G   = c Σ_n J_nᵀ H_{z,n} J_n                       (Gauss-Newton / GGN, PSD)
    NME = c Σ_n Σ_k [∇_z ℓ_n]_k ∇²_θ z_{n,k}          (nonlinear modelling error, indefinite)

(Dauphin, Agarwala & Mobahi 2024; the NME is Singh et al.'s "functional Hessian" ``H_F``.) The NME is
also the Hessian of the stop-gradient surrogate

    s(θ) = c Σ_n ⟨ stopgrad(∇_z ℓ_n), z_n(θ) ⟩

which needs one double-backward per product (:class:`SurrogateNMELinearOperator`).

:func:`decompose` returns the three operators (``H`` and ``G`` are curvlinops'
``HessianLinearOperator``/``GGNLinearOperator``, ``NME = H − G`` is their lazy difference) and a
:meth:`HessianDecomposition.summary` (a :class:`HessianSummary`) with traces, top eigenvalues,
``λ_min(H)``, Frobenius norms, ratios, per-block shares, the within- vs cross-layer split of the NME
and optional spectral densities. :meth:`~HessianDecomposition.exact_summary` computes them from
the dense matrices; :meth:`~HessianDecomposition.estimated_summary` with curvlinops' estimators
(Hutchinson, Hutch++, XTrace, ``hutchinson_squared_fro``, Papyan's Lanczos densities) and scipy's
``eigsh`` on ``op.to_scipy()``.

Randomness: every random draw comes from a seed. Estimators that draw from torch's global RNG
(curvlinops') run inside :func:`torch.random.fork_rng` seeded per call, so the caller's RNG state is
never changed; the probe vectors of the surrogate check come from a ``torch.Generator``.
"""

from .decomposition import HessianDecomposition, decompose
from .estimators import TRACE_ESTIMATORS, estimate_trace
from .operators import (
    SurrogateNMELinearOperator,
    assert_not_backpack_extended,
    dense_matrix,
    nme_surrogate_dense,
)
from .summaries import (
    BlockSummary,
    EigsInfo,
    HessianSummary,
    NMESplit,
    Ratios,
    SurrogateCheck,
    TraceEstimate,
)

__all__ = ["decompose", "HessianDecomposition", "HessianSummary", "TraceEstimate", "EigsInfo",
           "Ratios", "BlockSummary", "NMESplit", "SurrogateCheck", "SurrogateNMELinearOperator",
           "nme_surrogate_dense", "dense_matrix", "TRACE_ESTIMATORS", "estimate_trace",
           "assert_not_backpack_extended"]
