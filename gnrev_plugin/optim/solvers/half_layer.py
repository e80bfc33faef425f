"""One half-layer's system ``A = [S, 1]``: the generic (dual/primal) solve, the linear block's
small ``[X̃, 1]`` factor, the reference SVD, and float64 refinement (:class:`HalfLayerSystem`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...compat.torch import tensor_version
from .config import SolverConfig, default_rank_rtol, default_residual_rtol, keep_singular_values
from .gram_system import GramSystem
from .grams import _dual_gram_lower, _with_ones_t, primal_gram_with_ones
from .threads import single_threaded

__all__ = ["LinearFactor", "HalfLayerSolution", "HalfLayerSystem", "projection_factor",
           "factor_half_layer"]


@dataclass
class LinearFactor:
    """``S = core · basis`` for a linear half-layer: ``core = X L_C`` (``n×k``), ``basis = Q_C =
    L_C⁻¹ C`` (``k×M``, orthonormal rows).

    Attributes:
        core: :math:`X L_C`, ``(n, k)``.
        basis: :math:`Q_C = L_C^{-1} C`, ``(k, M)``.
    """

    core: torch.Tensor
    basis: torch.Tensor


@dataclass
class HalfLayerSolution:
    r"""``ΔW`` (``k×M``), ``Δb`` (``k``) and the achieved output change ``A Δ`` (``n×k``).

    ``target`` is the right-hand side ``E`` it solved, ``residual`` the relative residual
    ``‖E − AΔ‖/‖E‖`` (a 0-dim tensor; the caller synchronises once for all systems), ``thin``
    the solve on the factor ``B`` that :meth:`HalfLayerSystem.refine` continues (``(Z, R, coef,
    bias)`` for ``E = Z R``) and ``refined`` whether refinement produced it.

    Attributes:
        weight: :math:`\Delta W`, ``(k, M)``.
        bias: :math:`\Delta b`, ``(k,)``.
        achieved: :math:`A \Delta`, ``(n, k)``.
        target: :math:`E`.
        residual: :math:`\lVert E - A\Delta \rVert / \lVert E \rVert`.
        thin: ``(Z, R, coef, bias)`` of the thin solve.
        refined: Whether refinement produced it.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    achieved: torch.Tensor
    target: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    thin: tuple | None = None
    refined: bool = False


def projection_factor(C: torch.Tensor, dtype: torch.dtype,
                      cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L_C, Q_C)`` with ``C Cᵀ = L_C L_Cᵀ`` and ``Q_C = L_C⁻¹ C`` (orthonormal rows), in
    ``dtype``; ``None`` if ``C`` (``k×M``) is not of full row rank. Computed in float64 and cached
    per projection tensor (``C`` is a fixed buffer).

    Args:
        C: Projection :math:`C`, ``(k, M)``.
        dtype: Result dtype.
        cache: Per-step cache, or ``None``.

    Returns:
        ``(L_C, Q_C)``, or ``None``.
    """
    key = (id(C), tensor_version(C), C.data_ptr(), dtype, C.device)
    if cache is not None and key in cache:
        return cache[key]
    C64 = C.to(torch.float64)
    with single_threaded():
        L, info = torch.linalg.cholesky_ex(C64 @ C64.mT)
        d = L.diagonal().square()
        ok = bool((info == 0) & (d.min() > default_rank_rtol(C.shape[0], torch.float64) * d.max()))
        out = None
        if ok:
            Q = torch.linalg.solve_triangular(L, C64, upper=False)
            out = (L.to(dtype), Q.to(dtype))
    if cache is not None:
        cache[key] = out
    return out


class HalfLayerSystem:
    """The factored system of one half-layer with features ``S`` (``n×M``), ``A = [S, 1]``.

    Args:
        features: ``S`` (may be ``None`` when ``linear`` is given and the solver is not ``svd``).
        config: the solver configuration.
        linear: for a linear half-layer, ``S = core · basis`` (:class:`LinearFactor`): the solve
            then runs on ``B = [core, 1]`` (``n × (k+1)``).
        defer: form and factor the Gram but leave the host synchronisation that classifies it to
            the caller: ``pending`` holds the ``[factored, finite]`` flags on the device and
            :meth:`resolve` finishes with them (one synchronisation for all systems of a step).

    Attributes:
        n: batch size; ``rank``, ``full_rank`` (``rank == n``), ``exact`` (full row rank and not
        damped); ``kind``: ``"dual"``, ``"primal"``, ``"linear dual"``, ``"linear primal"`` or
        ``"svd"``; ``gram_method``: how the Gram was factored (:class:`GramSystem`).
        No jitter is ever added: a singular Gram is reported rank-deficient instead.
    """

    def __init__(self, features: torch.Tensor | None, config: SolverConfig,
                 linear: LinearFactor | None = None, *, defer: bool = False) -> None:
        if features is None and (linear is None or config.method == "svd"):
            raise ValueError("HalfLayerSystem needs the features S unless a linear factor is "
                             "given (and the solver is not 'svd')")
        self.S = features
        self.config = config
        self.linear = linear if config.method != "svd" else None
        ref = features if features is not None else linear.core
        self.n = n = ref.shape[0]
        self.dtype = ref.dtype
        self._svd = None
        self._gram = None
        gram_dtype = config.gram_dtype or self.dtype
        self.residual_rtol = (config.residual_rtol if config.residual_rtol is not None
                              else default_residual_rtol(self.dtype))
        self.pending = None
        if config.method == "svd":
            rank_rtol = config.rank_rtol
            self.kind = self.gram_method = "svd"
            self._factor_svd(default_rank_rtol(n, gram_dtype) if rank_rtol is None
                             else rank_rtol)
            self.full_rank = self.rank == n
            self.exact = self.full_rank
        else:
            core = self.linear.core if self.linear is not None else features
            self.core = core
            p = core.shape[1] + 1
            self.side = "dual" if n <= p else "primal"
            self.kind = ("linear " if self.linear is not None else "") + self.side
            c = core.to(gram_dtype)
            K = (_dual_gram_lower(c, config.factor_dtype) if self.side == "dual"
                 else primal_gram_with_ones(c, config.factor_dtype))
            self._gram = GramSystem(K, config, gram_dtype, defer=True, quadratic=self._quadratic)
            self.pending = self._gram.pending
            if not defer:
                self.resolve(*self.pending.tolist())

    def _quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """``xᵀ K x`` straight from the factor ``B = [core, 1]``: ``‖Bᵀx‖²`` (dual) or ``‖Bx‖²``
        (primal), without the rounding of the formed Gram."""
        c = self.core
        x = x.to(c.dtype)
        if self.side == "dual":
            return ((c.mT @ x).square().sum() + x.sum().square()).to(torch.float64)
        return (c @ x[:-1] + x[-1]).square().sum().to(torch.float64)

    def resolve(self, ok: bool = True, finite: bool = True) -> None:
        """Finish a deferred factorisation with its synchronised ``pending`` flags.

        Args:
            ok: The factorisation succeeded.
            finite: The Gram is finite.
        """
        if self._gram is not None and self._gram.pending is not None:
            self._gram.resolve(ok, finite)
        self.pending = None
        if self._gram is not None:
            self.gram_method = self._gram.method
            self.rank = self._gram.rank
            self.full_rank = self.rank == self.n
            self.exact = self.full_rank and self.config.method != "damped"

    def _factor_svd(self, rank_rtol: float) -> None:
        S = self.S
        A = torch.cat([S, torch.ones(S.shape[0], 1, dtype=S.dtype, device=S.device)], dim=1)
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = keep_singular_values(s.to(torch.float64).square(), self.config, rank_rtol)
        self._svd = (U[:, keep], s[keep], Vh[keep])
        self.rank = int(keep.sum())

    # -- solving ------------------------------------------------------------------------------
    def solve(self, E: torch.Tensor | None = None, *,
              factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> HalfLayerSolution:
        r"""Minimum-norm (or truncated / damped) solution of :math:`A \Delta = E` for :math:`E` (``n×k``).

        ``factors = (Z, R)`` gives the target as ``E = Z R`` with a thin ``Z`` (``n×c``, e.g. a
        target pulled back through the readout, ``c = C``): the solution is linear in ``E``, so
        the Gram solve, ``ΔW`` and the achieved change run on ``c`` columns and are expanded by
        ``R`` (``A⁺(Z R) = (A⁺Z) R``).

        Args:
            E: Target :math:`E`, ``(n, k)``; or ``None`` with ``factors``.
            factors: ``(Z, R)`` with :math:`E = Z R`.

        Returns:
            The :class:`HalfLayerSolution`.
        """
        Z, R = (E, None) if factors is None else factors
        if self._svd is not None:
            E = Z if R is None else Z @ R
            U, s, Vh = self._svd
            delta = Vh.mT @ ((U.mT @ E) / s[:, None])              # (M+1) × k
            return self._finish(E, None, delta[:-1].mT, delta[-1])
        return self._finish(Z, R, *self._coefficients(Z))

    def _coefficients(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_coreᵀ, v_b)`` of ``v = B⁺ Z`` on the dual or primal side (working dtype)."""
        wdt = self.dtype
        if self.side == "dual":
            lam = self._gram.solve(Z).to(wdt)
            return _with_ones_t(self.core, lam)
        rhs = torch.cat([self.core.mT @ Z, Z.sum(0, keepdim=True)])
        v = self._gram.solve(rhs).to(wdt)
        return v[:-1].mT, v[-1]

    def _finish(self, Z: torch.Tensor, R: torch.Tensor | None, coef: torch.Tensor,
                bias: torch.Tensor) -> HalfLayerSolution:
        """Weight, achieved change and residual of the coefficients ``v`` on ``B`` for ``Z R``.

        The change is ``B v`` from the coefficients as they will be applied (``S ΔWᵀ + Δb`` for
        the generic case: the true change of the half-layer up to the rounding of this product).
        """
        core = self.S if self.linear is None else self.linear.core
        achieved = torch.addmm(bias, core, coef.mT)            # B v = A Δ
        miss = Z - achieved
        thin = (Z, R, coef, bias)
        if R is not None:                                      # expand c columns to k
            achieved, miss, Z = achieved @ R, miss @ R, Z @ R
            bias = R.mT @ bias
            coef = R.mT @ coef
        basis = self.linear.basis if self.linear is not None else None
        if basis is None:
            weight = coef
        elif R is None:
            weight = coef @ basis
        else:
            weight = R.mT @ (thin[2] @ basis)                   # c·k·M + k·c·M, not k²M
        residual = miss.norm() / Z.norm().clamp_min(torch.finfo(Z.dtype).tiny)
        return HalfLayerSolution(weight, bias, achieved, target=Z, residual=residual, thin=thin)

    def refine(self, sol: HalfLayerSolution) -> HalfLayerSolution:
        """One step of iterative refinement in float64 with the residual through ``A``.

        ``r = Z − B v`` is formed in float64 from the solution as applied, then ``v ← v + Bᵀ K⁻¹ r``
        (dual) or ``v ← v + G⁻¹ Bᵀ r`` (primal); the new residual is measured again.

        Args:
            sol: A solution of :meth:`solve`.

        Returns:
            The refined solution.
        """
        if self._gram is None or sol.thin is None:
            return sol
        Z, R, coef, bias = sol.thin
        f64 = torch.float64
        core = (self.S if self.linear is None else self.linear.core).to(f64)
        coef, bias = coef.to(f64), bias.to(f64)
        r = Z.to(f64) - torch.addmm(bias, core, coef.mT)
        if self.side == "dual":
            dcoef, dbias = _with_ones_t(core, self._gram.solve(r).to(f64))
        else:
            dv = self._gram.solve(torch.cat([core.mT @ r, r.sum(0, keepdim=True)])).to(f64)
            dcoef, dbias = dv[:-1].mT, dv[-1]
        wdt = self.dtype
        out = self._finish(Z, R, (coef + dcoef).to(wdt), (bias + dbias).to(wdt))
        out.refined = True
        return out


def factor_half_layer(features: torch.Tensor | None, config: SolverConfig,
                      linear: LinearFactor | None = None, *, defer: bool = False
                      ) -> HalfLayerSystem:
    r"""Form and factor the system of one half-layer with features ``S = σ(Z C)``
    (``defer``: leave the host synchronisation to the caller, see :meth:`HalfLayerSystem.resolve`).

    Args:
        features: :math:`S = \sigma(Z C)`, ``(n, M)``, or ``None`` with ``linear``.
        config: How the system is solved.
        linear: The factor of a linear half-layer, or ``None``.
        defer: Leave the host synchronisation to the caller.

    Returns:
        The :class:`HalfLayerSystem`.
    """
    return HalfLayerSystem(features, config, linear, defer=defer)
