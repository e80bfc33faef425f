"""Structure-aware right-inverse solvers for one half-layer's Gauss-Newton system.

A half-layer ``Z ↦ σ(Z C) Wᵀ + b`` changes its output linearly in ``(ΔW, Δb)`` as ``A Δ`` with
the design matrix ``A = [S, 1] ∈ R^{n×(M+1)}``, ``S = σ(Z C)``, and ``Δ = [ΔWᵀ; Δbᵀ]``. The step
needs the minimum-norm least-squares solution ``Δ = A⁺ E`` of ``A Δ = E`` (``E ∈ R^{n×k}``,
``k = d/2``) and the change it achieves, ``A Δ`` (``= E`` when ``A`` has full row rank).

**The cheapest exact solve per case.** Write ``A = B Q`` with ``B ∈ R^{n×p}`` and ``Q`` with
orthonormal rows (``Q Qᵀ = I``). Then ``A⁺ = Qᵀ B⁺`` (all four Penrose conditions hold), so every
solve happens on ``B`` and only its smaller side is ever factored:

* **generic** (nonlinear σ): ``B = A``, ``Q = I``, ``p = M + 1``;
* **linear block** (σ = identity, ``S = X C``): with ``C Cᵀ = L_C L_Cᵀ`` (Cholesky) and
  ``Q_C = L_C⁻¹ C`` (orthonormal rows), ``A = [X L_C, 1] · diag(Q_C, 1)``, so ``B = [X̃, 1]`` with
  ``X̃ = X L_C`` and ``p = d/2 + 1``: the rank of a linear block is at most ``d/2 + 1`` and its solve
  costs ``O(n (d/2)²)`` instead of ``O(n² M)``. Then ``ΔW = v_Xᵀ Q_C`` for the solution
  ``v = [v_X; v_b] = B⁺E``.

and on ``B`` (``n × p``):

* ``n ≤ p`` — **dual**: ``K = B Bᵀ`` (``n×n``); with full row rank ``v = Bᵀ K⁻¹ E`` reproduces
  ``E`` exactly (Cholesky);
* ``n > p`` — **primal** (batch larger than the width): ``G = BᵀB`` (``p×p``); ``B`` usually has
  full *column* rank and ``v = G⁻¹ BᵀE`` is the least-squares solution (Cholesky); the system cannot
  have full row rank, so the half-layer takes the least-squares role;
* **true rank loss** of the Gram on the smaller side (Cholesky fails, a pivot falls below the
  floor ``rank_rtol · max_i K_ii``, or so does ``‖Bᵀx‖²`` (dual; ``‖Bx‖²`` primal) for the weakest
  direction ``x`` that two steps of inverse iteration with the factor find: unpivoted Cholesky
  is not rank-revealing): a rank-revealing QR with column pivoting (LAPACK ``gelsy``) of that
  Gram gives its pseudo-inverse, ``v = Bᵀ K⁺ E`` or ``v = G⁺ BᵀE`` (both ``= B⁺E``), and its
  numerical rank (``rcond = rank_rtol``). No eigendecomposition on this path.

Grams are formed in the working dtype (``gram_dtype``) and factored and solved in ``factor_dtype``
(float64), on one thread below :data:`SINGLE_THREAD_MAX` rows (pivoted QR and ``eigh`` always):
factorisations of a few hundred rows lose orders of magnitude to thread synchronisation when the
CPU is oversubscribed (measured in ``benchmarks/bench_step.py``).

**Honest accuracy.** Every solution carries the change it achieves, computed from the update as it
will be applied, ``A Δ = B v`` (``S ΔWᵀ + Δb`` for the generic dual), and its relative residual
``‖E − A Δ‖ / ‖E‖``. A Gram formed in float32 hides its own rounding from a residual against that
Gram (measured on MNIST: ``‖E − KΛ‖ ≈ 1e-12 ‖E‖`` while ``‖E − AΔ‖ ≈ 2e-4 ‖E‖``), hence the
residual through ``A``. :meth:`HalfLayerSystem.refine` takes one step of iterative refinement in
float64 with the residual through ``A`` (corrected semi-normal equations):
``Λ ← Λ + K⁻¹(E − A Aᵀ Λ)``.

Solvers (``method``):

* ``"cholesky"`` (default): the structure-aware dispatch above. With ``rtol``/``atol`` set, a
  rank-deficient Gram is truncated as by ``"eigh"``.
* ``"eigh"``: the Gram of the smaller side ``= V diag(μ) Vᵀ`` with ``μ = s²`` the squared singular
  values of ``A``; keeping ``s ≥ rtol·s_max`` and ``s ≥ atol`` (and ``μ > rank_rtol·μ_max``) gives
  the reference code's truncated SVD pseudo-inverse exactly, at Gram cost.
* ``"svd"``: the reference method, ``torch.linalg.svd(A)`` with the same truncation (slow; kept for
  comparison; ignores structure).
* ``"damped"``: ``(K + λI)⁻¹`` on the dual side, ``(G + λI)⁻¹ Bᵀ`` on the primal side (the same
  ``Aᵀ(AAᵀ + λI)⁻¹E``; never exact for ``λ > 0``).

``rank_rtol`` defaults to ``max(m, 100) · eps(gram dtype)`` for an ``m×m`` Gram
(:func:`default_rank_rtol`); ``residual_rtol`` to :func:`default_residual_rtol`.
"""

from __future__ import annotations

from .config import (
    RESIDUAL_RTOL,
    SOLVERS,
    SolverConfig,
    default_rank_rtol,
    default_residual_rtol,
    keep_singular_values,
)
from .gram_system import GramSystem
from .grams import _dual_gram_lower, gram_with_ones, primal_gram_with_ones
from .half_layer import (
    HalfLayerSolution,
    HalfLayerSystem,
    LinearFactor,
    factor_half_layer,
    projection_factor,
)
from .threads import SINGLE_THREAD_MAX, single_threaded

__all__ = ["SOLVERS", "RESIDUAL_RTOL", "SolverConfig", "GramSystem", "HalfLayerSystem",
           "HalfLayerSolution", "LinearFactor", "factor_half_layer", "projection_factor",
           "gram_with_ones", "primal_gram_with_ones", "_dual_gram_lower", "default_rank_rtol",
           "default_residual_rtol", "keep_singular_values", "single_threaded", "SINGLE_THREAD_MAX"]
