"""The solver configuration (:class:`SolverConfig`) and the rank/accuracy thresholds it implies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SOLVERS", "RESIDUAL_RTOL", "SolverConfig", "default_rank_rtol", "default_residual_rtol",
           "keep_singular_values"]

SOLVERS = ("cholesky", "eigh", "svd", "damped")

#: Relative residual ``‖E − AΔ‖/‖E‖`` every exactly solved system must meet, per working dtype.
RESIDUAL_RTOL = {torch.float64: 1e-10, torch.float32: 1e-3}


def default_residual_rtol(dtype: torch.dtype) -> float:
    """The accuracy an exact half-layer solve must reach in working dtype ``dtype``.

    float64: ``1e-10`` (the tests' whole-step tolerance is ``1e-8``); float32: ``1e-3`` (a Gram
    formed in float32 carries rounding ``≈ eps₃₂ κ(K)``: measured ``2e-4`` for a ReLU block on
    1000 MNIST images, ``κ ≈ 1e6``); lower precisions: ``1e-2``.

    Args:
        dtype: Working dtype.

    Returns:
        The relative residual bound.
    """
    return RESIDUAL_RTOL.get(dtype, 1e-2)


@dataclass(frozen=True)
class SolverConfig:
    """How each half-layer system is solved (see the module docstring).

    Attributes:
        method: one of :data:`SOLVERS`.
        rtol, atol: singular-value truncation (``s ≥ rtol·s_max``, ``s ≥ atol``).
        damping: ``λ`` of ``method="damped"``.
        rank_rtol: relative pivot / eigenvalue floor of the Grams (default
            :func:`default_rank_rtol`).
        gram_dtype: dtype the Grams are formed in (default: the working dtype).
        factor_dtype: dtype the Grams are factored and solved in.
        residual_rtol: accuracy an exact solve must meet (default
            :func:`default_residual_rtol` of the working dtype).
    """

    method: str = "cholesky"
    rtol: float = 0.0
    atol: float = 0.0
    damping: float = 0.0
    rank_rtol: float | None = None
    gram_dtype: torch.dtype | None = None
    factor_dtype: torch.dtype = torch.float64
    residual_rtol: float | None = None

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
        for name in ("gram_dtype", "factor_dtype"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, torch.dtype) and v.is_floating_point
                                      and not v.is_complex):
                raise ValueError(f"{name} must be a real floating torch.dtype, got {v!r}")
        if self.factor_dtype is None:
            raise ValueError("factor_dtype must be a real floating torch.dtype, got None")
        r = self.residual_rtol
        if r is not None and not (isinstance(r, (int, float)) and 0 < r < 1):
            raise ValueError(f"residual_rtol must be in (0, 1), got {r!r}")

    @property
    def truncates(self) -> bool:
        """Whether singular values are truncated.

        Returns:
            ``True`` if ``rtol`` or ``atol`` is set.
        """
        return bool(self.rtol or self.atol)



def default_rank_rtol(n: int, dtype: torch.dtype) -> float:
    r""":math:`\max(n, 100)\,\epsilon_{\mathrm{dtype}}`: relative floor for Gram eigenvalues and Cholesky
    pivots.

    Eigenvalues of a Gram formed in floating point carry errors of order ``eps · μ_max`` (times a
    modest constant), so smaller ones are noise; an exactly singular Gram gives pivots of a few
    ``eps`` (observed up to ~7 eps in float64), hence the floor of 100 for small ``n``.

    Args:
        n: Gram size.
        dtype: Dtype the Gram is formed in.

    Returns:
        :math:`\max(n, 100)\,\epsilon_{\mathrm{dtype}}`.
    """
    return max(n, 100) * torch.finfo(dtype).eps


def keep_singular_values(sq: torch.Tensor, config: SolverConfig, rank_rtol: float) -> torch.Tensor:
    r"""Mask of squared singular values ``μ = s²`` kept: ``μ > rank_rtol·μ_max``, ``s ≥ rtol·s_max``,
    ``s ≥ atol``.

    Args:
        sq: Squared singular values :math:`\mu`.
        config: Supplies ``rtol`` and ``atol``.
        rank_rtol: Relative eigenvalue floor.

    Returns:
        Boolean mask, shaped like ``sq``.
    """
    mu_max = sq.max().clamp_min(0)
    keep = sq > rank_rtol * mu_max
    if config.rtol:
        keep &= sq >= (config.rtol**2) * mu_max
    if config.atol:
        keep &= sq >= config.atol**2
    return keep

