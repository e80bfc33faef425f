"""Matrix-free Gauss-Newton solve: preconditioned conjugate gradients on ``(J Jᵀ + λI) Λ = b``.

Each iteration applies ``J Jᵀ`` as one VJP (``u = Jᵀ v``) and one JVP (``J u``) of the model, so
memory is ``O(P + nC)``: no Jacobian, no Gram. With ``b = −α vec ε`` the step is ``Δθ = JᵀΛ``.
CG's own (recursive) residual drifts from the true one in floating point, so the caller judges
the step by the **true** residual ``‖J Δθ − b‖ / ‖b‖``, recomputed with a separate JVP after the
solve (:meth:`JacobianProducts.jvp`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jvp, vjp

__all__ = ["CGResult", "conjugate_gradient", "JacobianProducts"]


@dataclass
class CGResult:
    """The solution, the iterations taken and CG's recursive relative residual."""

    solution: torch.Tensor
    iterations: int
    recursive_residual: float


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       preconditioner: torch.Tensor | Callable | None = None, tol: float = 1e-6,
                       max_iter: int = 500) -> CGResult:
    """Preconditioned CG for a symmetric positive (semi-)definite ``M`` given as ``matvec``.

    .. math::

        M\\Lambda = b, \\qquad \\text{stop when } \\|r_k\\| \\le \\mathrm{tol}\\,\\|b\\|

    Args:
        matvec: ``v ↦ M v``.
        b: right-hand side (1-D).
        preconditioner: the diagonal ``D`` of ``M`` (Jacobi, ``z = r / D``), a callable
            ``r ↦ P⁻¹ r`` (symmetric positive definite ``P``), or ``None``.
        tol: relative tolerance on the recursive residual.
        max_iter: iteration limit.

    Returns:
        :class:`CGResult` (``Λ`` starts at 0).
    """
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"cg_tol must be > 0 and cg_max_iter ≥ 1, got {tol}, {max_iter}")
    apply = preconditioner if callable(preconditioner) else None
    if isinstance(preconditioner, torch.Tensor):
        d = preconditioner.to(b.dtype)
        inv_d = torch.where(d > 0, 1.0 / d.clamp_min(torch.finfo(b.dtype).tiny), 1.0)

        def apply(r: torch.Tensor) -> torch.Tensor:
            return r * inv_d
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return CGResult(x, 0, 0.0)
    z = apply(r) if apply is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    k, res = 0, 1.0
    while k < max_iter:
        Mp = matvec(p)
        curvature = torch.dot(p, Mp)
        if curvature <= 0:
            break                      # a null direction of a semi-definite M: stop here
        step = rz / curvature
        x += step * p
        r -= step * Mp
        k += 1
        res = float(r.norm()) / b_norm
        if res <= tol:
            break
        z = apply(r) if apply is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return CGResult(x, k, res)


class JacobianProducts:
    """``J v`` (JVP) and ``Jᵀ λ`` (VJP) of ``θ ↦ F(θ, x)`` at the trained parameters.

    Args:
        forward: ``(trained, x) ↦ F`` (a functional call of the model).
        trained: the trained parameters by name.
        x: the batch.
    """

    def __init__(self, forward: Callable[[dict, torch.Tensor], torch.Tensor],
                 trained: dict[str, torch.Tensor], x: torch.Tensor) -> None:
        self._f = lambda p: forward(p, x)
        self.trained = trained
        self.output, self._vjp = vjp(self._f, trained)
        self.output = self.output.detach()

    def vjp(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Jᵀ λ`` for a flat ``λ`` (``nC``, sample-major), as parameter-shaped tensors."""
        cot = lam.reshape(self.output.shape).to(self.output.dtype)
        return self._vjp(cot)[0]

    def jvp(self, tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J u`` for parameter-shaped ``u``, flat (``nC``)."""
        return jvp(self._f, (self.trained,), (tangent,))[1].reshape(-1)

    def gram_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``J Jᵀ v`` (one VJP, one JVP), in ``v``'s dtype."""
        return self.jvp(self.vjp(v)).to(v.dtype)


def block_preconditioner(blocks: torch.Tensor, damping: float = 0.0
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Block-Jacobi ``r ↦ P⁻¹ r`` from the per-sample ``C × C`` diagonal blocks of ``J Jᵀ``.

    .. math::

        P = \\mathrm{blockdiag}_i\\big(K_{ii} + \\lambda I + \\delta_i I\\big)

    with ``δ_i`` a jitter of ``1e-10·tr K_ii / C`` (a rank-deficient block stays invertible).

    Args:
        blocks: ``(n, C, C)``.
        damping: ``λ``.

    Returns:
        The preconditioner as a function of a flat, sample-major ``r``.
    """
    n, C, _ = blocks.shape
    eye = torch.eye(C, dtype=blocks.dtype, device=blocks.device)
    jitter = 1e-10 * blocks.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300) / C
    L = torch.linalg.cholesky(blocks + (damping + jitter)[:, None, None] * eye)

    def apply(r: torch.Tensor) -> torch.Tensor:
        z = torch.cholesky_solve(r.reshape(n, C, 1).to(L.dtype), L)
        return z.reshape(-1).to(r.dtype)
    return apply
