"""Right-inverse solvers for one half-layer's Gauss-Newton system.

A half-layer ``Z ↦ σ(Z C) Wᵀ + b`` changes its output linearly in ``(ΔW, Δb)`` as
``A Δ`` with the design matrix ``A = [S, 1] ∈ R^{n×(M+1)}``, ``S = σ(Z C)``, and
``Δ = [ΔWᵀ; Δbᵀ] ∈ R^{(M+1)×k}``. The minimum-norm solution of ``A Δ = E`` is ``Δ = A⁺ E``.
With full row rank (``n ≤ M + 1``), ``A⁺ E = Aᵀ (A Aᵀ)⁻¹ E``: an ``n×n`` Gram ``K = S Sᵀ + 1 1ᵀ``
(``O(n²M)``) and a solve, instead of an SVD of ``A`` (``O(n²M)`` with a much larger constant).

Solvers (all return ``ΔW = Λᵀ S``, ``Δb = Λᵀ 1`` and the achieved change ``A Δ``):

* ``"cholesky"`` (default): ``Λ = K⁻¹ E``; ``K`` is formed in the working dtype and factored in
  float64. Full row rank is judged from the Cholesky pivots, ``min_i L_ii² > rank_rtol · max_i K_ii``;
  if that fails the least-squares solution of ``"eigh"`` is used and the system is reported
  rank-deficient.
* ``"eigh"``: ``K = V diag(μ) Vᵀ`` with ``μ = s²`` the squared singular values of ``A``. Keeping
  ``s ≥ rtol·s_max`` and ``s ≥ atol`` (and ``μ > rank_rtol·μ_max``) gives
  ``A⁺_trunc E = Aᵀ V_k diag(1/μ_k) V_kᵀ E``, the reference code's truncated SVD pseudo-inverse
  exactly, at Gram cost.
* ``"svd"``: the reference method, ``torch.linalg.svd(A)`` with the same truncation (slow; kept for
  comparison).
* ``"damped"``: ``Λ = (K + λI)⁻¹ E`` (never exact for ``λ > 0``).

``rank_rtol`` defaults to ``max(n, 100) · eps(dtype)`` (:func:`default_rank_rtol`): eigenvalues of a
Gram computed in floating point carry absolute errors of order ``eps · μ_max``, so smaller ones are
noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SOLVERS", "SolverConfig", "GramSystem", "HalfLayerSystem", "factor_half_layer",
           "gram_with_ones", "default_rank_rtol",
           "keep_singular_values"]

SOLVERS = ("cholesky", "eigh", "svd", "damped")


@dataclass(frozen=True)
class SolverConfig:
    """How each half-layer system is solved (see the module docstring)."""

    method: str = "cholesky"
    rtol: float = 0.0
    atol: float = 0.0
    damping: float = 0.0
    rank_rtol: float | None = None
    gram_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver {self.method!r}; choose from {SOLVERS}")
        for name in ("rtol", "atol", "damping"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {v!r}")
        if self.method == "damped" and not self.damping > 0:
            raise ValueError("solver='damped' needs damping > 0")
        if self.rank_rtol is not None and not 0 <= self.rank_rtol < 1:
            raise ValueError(f"rank_rtol must be in [0, 1), got {self.rank_rtol}")


@dataclass
class HalfLayerSolution:
    """``ΔW`` (``k×M``), ``Δb`` (``k``) and the achieved output change ``A Δ`` (``n×k``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    achieved: torch.Tensor


class GramSystem:
    """A factored symmetric PSD Gram ``K = A Aᵀ`` (float64) and its right-inverse solves.

    Attributes:
        n: size of ``K``.
        rank: numerical rank under the configured rule.
        full_rank: ``rank == n``: every target ``E`` is reproduced, ``A Aᵀ Λ = E``.
        exact: ``full_rank`` and no damping, so ``Aᵀ Λ`` is the exact minimum-norm right inverse.
    """

    def __init__(self, K: torch.Tensor, config: SolverConfig, eps_dtype: torch.dtype) -> None:
        if config.method == "svd":
            raise ValueError("GramSystem does not take solver='svd' (it factors A itself)")
        self.K = K = K.to(torch.float64)
        self.config = config
        self.n = n = K.shape[0]
        rank_rtol = config.rank_rtol
        self.rank_rtol = default_rank_rtol(n, eps_dtype) if rank_rtol is None else rank_rtol
        self._eig = None
        self._chol = None
        if config.method == "cholesky":
            L, info = torch.linalg.cholesky_ex(K)
            if int(info) == 0:
                piv = L.diagonal().square()
                if piv.min() > self.rank_rtol * K.diagonal().max():
                    self._chol = L
            if self._chol is None:
                self._factor_eigh()
            else:
                self.rank = n
        elif config.method == "damped":
            L, info = torch.linalg.cholesky_ex(
                K + config.damping * torch.eye(n, dtype=torch.float64, device=K.device))
            if int(info) != 0:  # pragma: no cover - K + λI with λ > 0 is positive definite
                raise torch.linalg.LinAlgError("Cholesky of the damped Gram failed")
            self._chol = L
            self.rank = n
        else:  # eigh
            self._factor_eigh()
        self.full_rank = self.rank == n
        self.exact = self.full_rank and config.method != "damped"

    def _factor_eigh(self) -> None:
        mu, V = torch.linalg.eigh(self.K)
        keep = keep_singular_values(mu, self.config, self.rank_rtol)
        self._eig = (mu[keep], V[:, keep])
        self.rank = int(keep.sum())
        self._chol = None

    def solve(self, E: torch.Tensor) -> torch.Tensor:
        """``Λ`` (float64) with ``A⁺E = Aᵀ Λ`` (truncated/damped as configured)."""
        E64 = E.to(torch.float64)
        if self._chol is not None:
            return torch.cholesky_solve(E64, self._chol)
        mu, V = self._eig
        return V @ ((V.mT @ E64) / mu[:, None])


def default_rank_rtol(n: int, dtype: torch.dtype) -> float:
    """``max(n, 100) · eps(dtype)``: relative floor for Gram eigenvalues and Cholesky pivots.

    Eigenvalues of a Gram formed in floating point carry errors of order ``eps · μ_max`` (times a
    modest constant), so smaller ones are noise; an exactly singular Gram gives pivots of a few
    ``eps`` (observed up to ~7 eps in float64), hence the floor of 100 for small ``n``.
    """
    return max(n, 100) * torch.finfo(dtype).eps


def keep_singular_values(sq: torch.Tensor, config: SolverConfig, rank_rtol: float) -> torch.Tensor:
    """Mask of squared singular values ``μ = s²`` kept: ``μ > rank_rtol·μ_max``, ``s ≥ rtol·s_max``,
    ``s ≥ atol``."""
    mu_max = sq.max().clamp_min(0)
    keep = sq > rank_rtol * mu_max
    if config.rtol:
        keep &= sq >= (config.rtol**2) * mu_max
    if config.atol:
        keep &= sq >= config.atol**2
    return keep


def gram_with_ones(S: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    """``K = S Sᵀ + 1 1ᵀ`` (the Gram of ``A = [S, 1]``), exactly symmetric.

    For ``n ≥ 2·block_rows`` only the lower block triangle is multiplied (row block ``i`` against
    rows ``0..i`` in one product) and mirrored: about ``(b+1)/(2b)`` of the FLOPs of ``S Sᵀ`` for
    ``b`` row blocks, in large, efficient matrix products.
    """
    n = S.shape[0]
    if n < 2 * block_rows:
        K = S @ S.mT
    else:
        K = torch.empty(n, n, dtype=S.dtype, device=S.device)
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            K[start:stop, :stop] = S[start:stop] @ S[:stop].mT
    K = torch.tril(K) + torch.tril(K, -1).mT
    return K.add_(1.0)


class HalfLayerSystem:
    """The factored system of one half-layer with features ``S`` (``n×M``), ``A = [S, 1]``.

    Attributes ``n``, ``rank``, ``full_rank`` and ``exact`` as in :class:`GramSystem`. No jitter is
    ever added: a singular Gram is reported rank-deficient instead.
    """

    def __init__(self, features: torch.Tensor, config: SolverConfig) -> None:
        self.S = features
        self.config = config
        self.n = n = features.shape[0]
        self._svd = None
        self._gram = None
        gram_dtype = config.gram_dtype or features.dtype
        if config.method == "svd":
            rank_rtol = config.rank_rtol
            self._factor_svd(default_rank_rtol(n, gram_dtype) if rank_rtol is None
                             else rank_rtol)
        else:
            self._gram = GramSystem(gram_with_ones(features.to(gram_dtype)), config, gram_dtype)
            self.rank = self._gram.rank
        self.full_rank = self.rank == n
        self.exact = self.full_rank and config.method != "damped"

    def _factor_svd(self, rank_rtol: float) -> None:
        S = self.S
        A = torch.cat([S, torch.ones(S.shape[0], 1, dtype=S.dtype, device=S.device)], dim=1)
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = keep_singular_values(s.to(torch.float64).square(), self.config, rank_rtol)
        self._svd = (U[:, keep], s[keep], Vh[keep])
        self.rank = int(keep.sum())

    def solve(self, E: torch.Tensor) -> HalfLayerSolution:
        """Minimum-norm (or truncated / damped) solution of ``A Δ = E`` for ``E`` (``n×k``)."""
        if self._svd is not None:
            U, s, Vh = self._svd
            coef = (U.mT @ E) / s[:, None]
            delta = Vh.mT @ coef                      # (M+1) × k
            return HalfLayerSolution(delta[:-1].mT, delta[-1], U @ (U.mT @ E))
        lam64 = self._gram.solve(E)
        achieved = (self._gram.K @ lam64).to(E.dtype)
        lam = lam64.to(self.S.dtype)
        return HalfLayerSolution(lam.mT @ self.S, lam.sum(0), achieved)


def factor_half_layer(features: torch.Tensor, config: SolverConfig) -> HalfLayerSystem:
    """Form and factor the system of one half-layer with features ``S = σ(Z C)``."""
    return HalfLayerSystem(features, config)
