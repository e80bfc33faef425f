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

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import NonFiniteError

__all__ = ["SOLVERS", "SolverConfig", "GramSystem", "HalfLayerSystem", "HalfLayerSolution",
           "LinearFactor", "factor_half_layer", "projection_factor", "gram_with_ones",
           "default_rank_rtol", "default_residual_rtol", "keep_singular_values",
           "single_threaded"]

SOLVERS = ("cholesky", "eigh", "svd", "damped")

#: Relative residual ``‖E − AΔ‖/‖E‖`` every exactly solved system must meet, per working dtype.
RESIDUAL_RTOL = {torch.float64: 1e-10, torch.float32: 1e-3}


def default_residual_rtol(dtype: torch.dtype) -> float:
    """The accuracy an exact half-layer solve must reach in working dtype ``dtype``.

    float64: ``1e-10`` (the tests' whole-step tolerance is ``1e-8``); float32: ``1e-3`` (a Gram
    formed in float32 carries rounding ``≈ eps₃₂ κ(K)``: measured ``2e-4`` for a ReLU block on
    1000 MNIST images, ``κ ≈ 1e6``); lower precisions: ``1e-2``.
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
        return bool(self.rtol or self.atol)


# ----------------------------------------------------------------------------------- threads
_THREAD_LOCK = threading.RLock()
_THREAD_DEPTH = 0
_THREAD_SAVED = 1


#: Gram systems smaller than this are factored and solved on one thread; larger ones use the
#: configured thread count (a 1024×1024 float64 Cholesky gains from two threads on an idle
#: machine, and is large enough per synchronisation not to collapse when the CPU is busy).
SINGLE_THREAD_MAX = 768


class single_threaded:  # noqa: N801 - a context manager, like torch.no_grad
    """Run the enclosed (small) factorisations and solves on one intra-op thread.

    ``single_threaded(False)`` does nothing (for systems large enough to gain from threads).

    LAPACK factorisations of a few hundred rows synchronise their threads once per panel; when
    another process holds the cores each synchronisation waits for a time slice, and a 128×128
    ``eigh`` was measured at 4.6 s instead of 9 ms. One thread has no such waits. Re-entrant; the
    previous thread count is restored on exit.
    """

    def __init__(self, active: bool = True) -> None:
        self.active = active

    def __enter__(self) -> single_threaded:
        global _THREAD_DEPTH, _THREAD_SAVED
        if not self.active:
            return self
        _THREAD_LOCK.acquire()
        if _THREAD_DEPTH == 0:
            _THREAD_SAVED = torch.get_num_threads()
            if _THREAD_SAVED != 1:
                torch.set_num_threads(1)
        _THREAD_DEPTH += 1
        return self

    def __exit__(self, *exc) -> None:
        global _THREAD_DEPTH
        if not self.active:
            return
        _THREAD_DEPTH -= 1
        if _THREAD_DEPTH == 0 and _THREAD_SAVED != 1:
            torch.set_num_threads(_THREAD_SAVED)
        _THREAD_LOCK.release()


# ----------------------------------------------------------------------------------- helpers
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
    """``K = S Sᵀ + 1 1ᵀ`` (the dual Gram of ``B = [S, 1]``), exactly symmetric.

    For ``n ≥ 2·block_rows`` only the lower block triangle is multiplied (row block ``i`` against
    rows ``0..i`` in one product) and mirrored: about ``(b+1)/(2b)`` of the FLOPs of ``S Sᵀ`` for
    ``b`` row blocks, in large, efficient matrix products.
    """
    K = _lower_block_products(S, block_rows)
    K = torch.tril(K) + torch.tril(K, -1).mT
    return K.add_(1.0)


def _lower_block_products(S: torch.Tensor, block_rows: int) -> torch.Tensor:
    """``S Sᵀ`` with only its lower triangle guaranteed: one product for ``n < 2·block_rows``,
    else row block ``i`` against rows ``0..i``."""
    n = S.shape[0]
    if n < 2 * block_rows:
        return S @ S.mT
    K = torch.empty(n, n, dtype=S.dtype, device=S.device)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        K[start:stop, :stop] = S[start:stop] @ S[:stop].mT
    return K


def _dual_gram_lower(S: torch.Tensor, dtype: torch.dtype, block_rows: int = 256) -> torch.Tensor:
    """``K = S Sᵀ + 1 1ᵀ`` in ``dtype`` with only the **lower** triangle guaranteed (what Cholesky
    reads; :class:`GramSystem` mirrors it on the rare paths that need the full matrix). Same lower
    block triangle products as :func:`gram_with_ones`, without the mirroring passes; the ``+1`` is
    added after the conversion, exactly."""
    return _lower_block_products(S, block_rows).to(dtype).add_(1.0)


def primal_gram_with_ones(S: torch.Tensor, dtype: torch.dtype | None = None,
                          block_cols: int = 128) -> torch.Tensor:
    """``G = BᵀB = [[SᵀS, Sᵀ1], [1ᵀS, n]]`` (the primal Gram of ``B = [S, 1]``) in ``dtype``.

    Only the **lower** triangle of ``SᵀS`` is formed (column block ``i`` against columns
    ``0..i``, about ``(b+1)/(2b)`` of the FLOPs for ``b`` blocks) and guaranteed; the last row
    and column are complete. Cholesky reads nothing else (see :class:`GramSystem`).
    """
    n, m = S.shape
    G = torch.empty(m + 1, m + 1, dtype=S.dtype, device=S.device)
    if m < 2 * block_cols:
        G[:m, :m] = S.mT @ S
    else:
        for start in range(0, m, block_cols):
            stop = min(start + block_cols, m)
            G[start:stop, :stop] = S[:, start:stop].mT @ S[:, :stop]
    col = S.sum(0)
    G[m, :m] = col
    G[:m, m] = col
    G[m, m] = n
    return G if dtype is None else G.to(dtype)


def _with_ones_t(core: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[coreᵀ Λ; 1ᵀ Λ]`` as ``(Λᵀ core, Λᵀ 1)``."""
    return lam.mT @ core, lam.sum(0)


# ----------------------------------------------------------------------------------- Gram system
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
        """Finish the factorisation from the synchronised flags (fallbacks when ``ok`` is False)."""
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
        factor dtype."""
        E64 = E.to(self.K.dtype)
        with single_threaded(self._small):
            if self._chol is not None:
                return torch.cholesky_solve(E64, self._chol)
            if self._pinv is not None:
                return self._pinv @ E64
            mu, V = self._eig
            return V @ ((V.mT @ E64) / mu[:, None])


# ----------------------------------------------------------------------------------- half-layer
@dataclass
class LinearFactor:
    """``S = core · basis`` for a linear half-layer: ``core = X L_C`` (``n×k``), ``basis = Q_C =
    L_C⁻¹ C`` (``k×M``, orthonormal rows)."""

    core: torch.Tensor
    basis: torch.Tensor


@dataclass
class HalfLayerSolution:
    """``ΔW`` (``k×M``), ``Δb`` (``k``) and the achieved output change ``A Δ`` (``n×k``).

    ``target`` is the right-hand side ``E`` it solved, ``residual`` the relative residual
    ``‖E − AΔ‖/‖E‖`` (a 0-dim tensor; the caller synchronises once for all systems), ``thin``
    the solve on the factor ``B`` that :meth:`HalfLayerSystem.refine` continues (``(Z, R, coef,
    bias)`` for ``E = Z R``) and ``refined`` whether refinement produced it.
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
    per projection tensor (``C`` is a fixed buffer)."""
    key = (id(C), C._version, C.data_ptr(), dtype, C.device)
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
        """Finish a deferred factorisation with its synchronised ``pending`` flags."""
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
        """Minimum-norm (or truncated / damped) solution of ``A Δ = E`` for ``E`` (``n×k``).

        ``factors = (Z, R)`` gives the target as ``E = Z R`` with a thin ``Z`` (``n×c``, e.g. a
        target pulled back through the readout, ``c = C``): the solution is linear in ``E``, so
        the Gram solve, ``ΔW`` and the achieved change run on ``c`` columns and are expanded by
        ``R`` (``A⁺(Z R) = (A⁺Z) R``).
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
    """Form and factor the system of one half-layer with features ``S = σ(Z C)``
    (``defer``: leave the host synchronisation to the caller, see :meth:`HalfLayerSystem.resolve`)."""
    return HalfLayerSystem(features, config, linear, defer=defer)
