"""One factored Gram: the full-rank Cholesky (dual or primal side), the rank-revealing pivoted QR,
``eigh`` truncation and the damped solve (:class:`GramSystem`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import NonFiniteError
from .config import SolverConfig, default_rank_rtol, keep_singular_values
from .threads import SINGLE_THREAD_MAX, single_threaded

__all__ = ["GramSystem"]


class GramSystem:
    """A factored symmetric PSD Gram ``K`` (``m×m``) and its (pseudo-)inverse solves.

    Only the lower triangle of ``K`` is read (Cholesky reads nothing else; the rank-revealing and
    ``eigh`` paths mirror it first), so a caller may leave the upper triangle unset. With
    ``defer=True`` the classification waits for :meth:`resolve` (see ``pending``), so that one
    host synchronisation serves many systems.

    Attributes:
        n: size ``m`` of ``K`` (the name is kept for the dual Gram ``K = A Aᵀ``).
        rank: numerical rank under the configured rule.
        full_rank: ``rank == m``.
        exact: ``full_rank`` and no damping.
        method: ``"cholesky"``, ``"qrcp"`` (rank-revealing pivoted-QR pseudo-inverse),
            ``"eigh"`` or ``"damped"``: how ``K`` was factored.

    Raises:
        NonFiniteError: ``K`` has non-finite entries (features that overflow the Gram dtype).
    """

    def __init__(self, K: torch.Tensor, config: SolverConfig, eps_dtype: torch.dtype,
                 *, defer: bool = False,
                 quadratic: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if config.method == "svd":
            raise ValueError("GramSystem does not take solver='svd' (it factors A itself)")
        self.config = config
        self.n = n = K.shape[0]
        rank_rtol = config.rank_rtol
        self.rank_rtol = default_rank_rtol(n, eps_dtype) if rank_rtol is None else rank_rtol
        self._chol = self._eig = self._pinv = None
        self._small = n < SINGLE_THREAD_MAX
        with single_threaded(self._small):
            self.K = K = K.to(config.factor_dtype)
            diag = K.diagonal()
            # A Gram's entries obey |K_ij| ≤ √(K_ii K_jj): a finite diagonal means a finite K.
            finite = torch.isfinite(diag).all()
            if config.method == "cholesky":
                L, info = torch.linalg.cholesky_ex(K)
                floor = self.rank_rtol * diag.max()
                # Unpivoted Cholesky is not rank-revealing: rounding can lift a zero pivot of a
                # singular Gram well above the floor. Two steps of inverse iteration with the
                # factor find the weakest direction x; its Rayleigh quotient with the Gram itself
                # (``quadratic``, e.g. ‖Bᵀx‖² from the factor B) decides.
                x = self._inverse_iteration(L)
                rq = quadratic(x) if quadratic is not None else x @ (self._symmetric() @ x)
                ok = (info == 0) & (L.diagonal().square().min() > floor) & (rq > floor)
            elif config.method == "damped":
                L, info = torch.linalg.cholesky_ex(
                    K + config.damping * torch.eye(n, dtype=K.dtype, device=K.device))
                ok = info == 0
            else:  # eigh
                L, ok = None, finite
        self._L = L
        #: ``[factored, finite]`` flags still on the device: :meth:`resolve` takes them as
        #: Python booleans, so a caller can synchronise once for many systems.
        self.pending = torch.stack([ok, finite])
        if not defer:
            self.resolve(*self.pending.tolist())

    def resolve(self, ok: bool, finite: bool) -> None:
        """Finish the factorisation from the synchronised flags (fallbacks when ``ok`` is False).

        Args:
            ok: The factorisation succeeded.
            finite: The Gram is finite.
        """
        self._check_finite(finite)
        config, n, L = self.config, self.n, self._L
        self._L = self.pending = None
        with single_threaded(self._small):
            if config.method == "cholesky":
                if ok:
                    self._chol, self.rank, self.method = L, n, "cholesky"
                elif config.truncates:
                    self._factor_eigh()
                else:
                    self._factor_qrcp()
            elif config.method == "damped":
                if not ok:  # pragma: no cover - K + λI with λ > 0 is positive definite
                    raise torch.linalg.LinAlgError("Cholesky of the damped Gram failed")
                self._chol, self.rank, self.method = L, n, "damped"
            else:
                self._factor_eigh()
        self.full_rank = self.rank == n
        self.exact = self.full_rank and config.method != "damped"

    @staticmethod
    def _inverse_iteration(L: torch.Tensor, steps: int = 2) -> torch.Tensor:
        """Unit ``x`` after ``steps`` of ``x ← (L Lᵀ)⁻¹ x`` from a fixed pseudo-random start."""
        g = torch.Generator(device="cpu").manual_seed(0x5EED)
        x = torch.randn(L.shape[0], 1, generator=g, dtype=L.dtype, device="cpu").to(L.device)
        for _ in range(steps):
            x = torch.cholesky_solve(x, L)
            x = x / x.norm().clamp_min(torch.finfo(L.dtype).tiny)
        return x[:, 0]

    @staticmethod
    def _check_finite(finite: bool) -> None:
        if not finite:
            raise NonFiniteError(
                "the Gauss-Newton Gram has non-finite entries: the features overflow the Gram "
                "dtype (inputs far too large?); the parameters were not changed")

    def _symmetric(self) -> torch.Tensor:
        K = self.K
        return torch.tril(K) + torch.tril(K, -1).mT

    def _factor_eigh(self) -> None:
        with single_threaded():          # eigh's many panel synchronisations: always one thread
            mu, V = torch.linalg.eigh(self._symmetric())
        keep = keep_singular_values(mu, self.config, self.rank_rtol)
        self._eig = (mu[keep], V[:, keep])
        self.rank = int(keep.sum())
        self.method = "eigh"

    def _factor_qrcp(self) -> None:
        """``K⁺`` by QR with column pivoting (LAPACK ``gelsy``, CPU), rank with ``rcond = rank_rtol``.

        For symmetric PSD ``K`` the minimum-norm least-squares solution of ``K X = I`` is ``K⁺``
        truncated at the numerical rank.
        """
        K = self.K
        Kc = self._symmetric().cpu()
        eye = torch.eye(self.n, dtype=K.dtype, device="cpu")
        with single_threaded():          # pivoted QR is BLAS-2 heavy: always one thread
            res = torch.linalg.lstsq(Kc, eye, rcond=self.rank_rtol, driver="gelsy")
        pinv = res.solution
        self._pinv = 0.5 * (pinv + pinv.mT)
        self._pinv = self._pinv.to(K.device)   # a no-op on the CPU
        self.rank = int(res.rank)
        self.method = "qrcp"

    def solve(self, E: torch.Tensor) -> torch.Tensor:
        """``X = K⁻¹ E`` (``K⁺E`` when rank-deficient; truncated/damped as configured), in the
        factor dtype.

        Args:
            E: Right-hand sides, ``(m, c)``.

        Returns:
            :math:`K^{-1} E` (or :math:`K^+ E`), ``(m, c)``.
        """
        E64 = E.to(self.K.dtype)
        with single_threaded(self._small):
            if self._chol is not None:
                return torch.cholesky_solve(E64, self._chol)
            if self._pinv is not None:
                return self._pinv @ E64
            mu, V = self._eig
            return V @ ((V.mT @ E64) / mu[:, None])


# ----------------------------------------------------------------------------------- half-layer
