r"""Row-split half-layer systems: the distributed ExactGN step without a solving root.

Every half-layer system ``A Δ = E`` with ``A = [S, 1]`` (or ``B = [X̃, 1]`` for a linear block)
couples all samples only through a few sums over rows; everything else is row-local. Rank ``r``
holds the rows ``R_r`` of the features ``S_r``, of the targets ``E_r`` and of every tangent of
the inverse-JVP sweeps, so the sweeps, the achieved changes ``A_r Δ`` and the residuals run on
the local rows; per system only these steps communicate (:class:`~.distributed.Comm`):

* **dual** (``n ≤ p``, ``K = B Bᵀ``, ``n×n``): the features are all-gathered and each rank forms
  its share of the lower triangle of ``K`` (its diagonal block and half of each off-diagonal
  block, :func:`gram_tiles`: ``n²p / 2W`` multiply-adds per rank, balanced); the tiles are
  gathered on the system's **owner**, which factors ``K``. A solve gathers ``Z`` on the owner,
  which scatters ``Λ = K⁻¹ Z`` back by rows; then

  .. math::
      ΔW^T = \sum_r S_r^T Λ_r, \qquad Δb = \sum_r Λ_r^T 1

  is one all-reduce.
* **primal** (``n > p``, ``G = BᵀB``, ``p×p``): ``G = Σ_r B_rᵀ B_r`` and the right-hand side
  ``Σ_r B_rᵀ Z_r`` are reductions onto the owner, which solves and broadcasts ``v = G⁻¹BᵀZ``.
* **residual**: ``‖E − AΔ‖² = Σ_r ‖E_r − A_r Δ‖²`` is one all-reduce, so every rank reads the
  same global residual and takes the same decisions (refinement, demotion, the report).

Only the factorisations are centralised, and each on its own owner: the systems of a step are
assigned greedily to the least-loaded rank by their cost ``m³`` (``m`` the Gram's size), and all
owners factor at the same time (:func:`resolve_row_split`), so with ``2L ≥ W`` systems the
``O(m³)`` work is spread as well. The rank test of the unpivoted Cholesky factor (the Rayleigh
quotient ``‖Bᵀx‖²`` or ``‖Bx‖²`` of the weakest direction ``x``) is itself a sum over rows: one
all-reduce for all systems. Fallbacks (pivoted QR, ``eigh``) run on the owner; the ranks learn
each system's rank and method in one all-reduce.

Every rank ends with bitwise the same ``ΔW, Δb`` (all-reduced or broadcast) and the same report.
Costs per dual system and step: all-gather of ``n·p`` features, gather of ``≈ n²/2`` Gram
entries on the owner, per solve a gather and a scatter of ``n·c`` numbers and an all-reduce of
``c·(p+1)``; per primal system a reduce of ``p²`` and per solve a reduce and a broadcast of
``c·(p+1)``.
"""

from __future__ import annotations

import torch

from .distributed import Comm
from .solvers import SolverConfig
from .solvers.config import default_residual_rtol
from .solvers.gram_system import GramSystem
from .solvers.grams import _with_ones_t, primal_gram_with_ones
from .solvers.half_layer import HalfLayerSolution, HalfLayerSystem, LinearFactor

__all__ = ["RowSplitHalfLayer", "row_split_factory", "resolve_row_split", "gram_tiles"]

_METHODS = ("cholesky", "qrcp", "eigh", "damped")


def _half(n: int) -> int:
    return n // 2


def gram_tiles(sizes: list[int], rank: int) -> list[tuple[int, int, int, int, bool]]:
    """The lower-triangle tiles of ``K = S Sᵀ`` that ``rank`` forms: ``(row0, row1, col0, col1,
    own_rows_first)`` in global rows, in a fixed order the owner reads back.

    Rank ``q`` forms its diagonal block ``K[R_q, R_q]``, for every later rank ``s`` the block
    ``K[R_s^a, R_q]`` (``R_s^a`` the first half of ``R_s``) and for every earlier rank ``r`` the
    block ``K[R_q^b, R_r]`` (the second half of its own rows): together the lower triangle, about
    ``n²/(2W)`` entries per rank for equal shards.
    """
    off = [sum(sizes[:r]) for r in range(len(sizes))]
    q0, q1 = off[rank], off[rank] + sizes[rank]
    tiles = [(q0, q1, q0, q1, True)]
    for s in range(rank + 1, len(sizes)):
        tiles.append((off[s], off[s] + _half(sizes[s]), q0, q1, False))
    for r in range(rank):
        tiles.append((q0 + _half(sizes[rank]), q1, off[r], off[r] + sizes[r], True))
    return tiles


class RowSplitHalfLayer(HalfLayerSystem):
    """A :class:`~.solvers.HalfLayerSystem` whose rows are split over the ranks of ``comm``.

    Same interface (``solve``, ``refine``, ``rank``, ``full_rank``, ``exact``, ``kind``,
    ``gram_method``, ``residual_rtol``) on the local rows; ``n`` is the global batch. Built by
    :func:`row_split_factory`, classified by :func:`resolve_row_split`.
    """

    def __init__(self, features: torch.Tensor | None, config: SolverConfig,
                 linear: LinearFactor | None, comm: Comm, owner: int) -> None:
        if config.method == "svd":
            raise ValueError("the row-split solve does not take solver='svd'")
        self.S, self.config = features, config
        self.linear = linear
        self.comm, self.owner = comm, owner
        self.core = core = linear.core if linear is not None else features
        self.n = n = comm.n_total
        self.dtype = core.dtype
        self._svd = self._gram = None
        self.pending = None
        self.residual_rtol = (config.residual_rtol if config.residual_rtol is not None
                              else default_residual_rtol(self.dtype))
        self.gram_dtype = config.gram_dtype or self.dtype
        p = core.shape[1] + 1
        self.side = "dual" if n <= p else "primal"
        self.kind = ("linear " if linear is not None else "") + self.side
        c = core.to(self.gram_dtype)
        self._K = self._form_dual(c) if self.side == "dual" else self._form_primal(c)

    @property
    def is_owner(self) -> bool:
        return self.comm.rank == self.owner

    def _form_dual(self, c: torch.Tensor) -> torch.Tensor | None:
        """This rank's tiles of ``S Sᵀ`` from the all-gathered features; ``K = S Sᵀ + 11ᵀ``
        (lower triangle, factor dtype) on the owner."""
        comm = self.comm
        full = comm.all_gather_rows(c)
        mine = [full[a:b] @ full[i:j].mT for a, b, i, j, _ in gram_tiles(comm.sizes, comm.rank)]
        lengths = [sum((b - a) * (j - i) for a, b, i, j, _ in gram_tiles(comm.sizes, r))
                   for r in range(comm.world)]
        flat = torch.cat([t.reshape(-1) for t in mine]) if mine else c.new_zeros(0)
        got = comm.gather_flat(flat, lengths, self.owner)
        if got is None:
            return None
        n = self.n
        K = torch.empty(n, n, dtype=c.dtype, device=c.device)
        for r, vec in enumerate(got):
            pos = 0
            for a, b, i, j, _ in gram_tiles(comm.sizes, r):
                size = (b - a) * (j - i)
                K[a:b, i:j] = vec[pos:pos + size].reshape(b - a, j - i)
                pos += size
        return K.to(self.config.factor_dtype).add_(1.0)

    def _form_primal(self, c: torch.Tensor) -> torch.Tensor | None:
        """``G = Σ_r B_rᵀB_r`` (lower triangle and last row/column, factor dtype) on the owner."""
        G = self.comm.reduce_to(primal_gram_with_ones(c), self.owner)
        return None if G is None else G.to(self.config.factor_dtype)

    # -- classification (resolve_row_split) --------------------------------------------------
    def factor_local(self) -> None:
        """Owner only: factor the Gram; the Rayleigh-quotient part of the rank test is left to
        :func:`resolve_row_split` (it sums over the ranks' rows)."""
        self._probe = None

        def probe(x):
            self._probe = x
            return torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
        self._gram = GramSystem(self._K, self.config, self.gram_dtype, defer=True, quadratic=probe)
        self._K = None

    def quadratic_part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``‖Bᵀx‖²`` (dual: the ``p`` sums ``Bᵀx`` over its rows, squared
        after the all-reduce) or of ``‖Bx‖²`` (primal: one partial sum of squares)."""
        c = self.core
        x = x.to(c.dtype)
        if self.side == "dual":
            lo = self.comm.offset()
            xr = x[lo:lo + c.shape[0]]
            return torch.cat([c.mT @ xr, xr.sum().reshape(1)]).to(torch.float64)
        return (c @ x[:-1] + x[-1]).square().sum().reshape(1).to(torch.float64)

    def probe_size(self) -> tuple[int, int]:
        """Lengths of the direction ``x`` and of :meth:`quadratic_part`."""
        p = self.core.shape[1] + 1
        return (self.n, p) if self.side == "dual" else (p, 1)

    # -- solving ------------------------------------------------------------------------------
    def solve(self, E: torch.Tensor | None = None, *,
              factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> HalfLayerSolution:
        """:meth:`HalfLayerSystem.solve` on the local rows, with the global residual."""
        Z, R = (E, None) if factors is None else factors
        return self._finish(Z, R, *self._coefficients(Z))

    def _coefficients(self, Z: torch.Tensor, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_coreᵀ, v_b)`` of ``v = B⁺ Z`` from the local rows ``Z`` (every rank the same)."""
        comm, wdt = self.comm, dtype or self.dtype
        core = self.core.to(wdt)
        c = Z.shape[1]
        if self.side == "dual":
            full = comm.gather_rows_to(Z, self.owner)
            lam = None if full is None else self._gram.solve(full).to(wdt)
            lam_r = comm.scatter_rows(lam, self.owner, c, wdt)
            coef, bias = _with_ones_t(core, lam_r)
            packed = comm.all_reduce_sum(torch.cat([coef.reshape(-1), bias]))
            return packed[:-c].reshape(coef.shape), packed[-c:]
        rhs = comm.reduce_to(torch.cat([core.mT @ Z.to(wdt), Z.to(wdt).sum(0, keepdim=True)]),
                             self.owner)
        v = None if rhs is None else self._gram.solve(rhs).to(wdt)
        v = comm.broadcast_from(v, self.owner, (core.shape[1] + 1, c), wdt)
        return v[:-1].mT, v[-1]

    def _finish(self, Z: torch.Tensor, R: torch.Tensor | None, coef: torch.Tensor,
                bias: torch.Tensor) -> HalfLayerSolution:
        sol = super()._finish(Z, R, coef, bias)
        miss, target = self.comm.sum_squares(sol.target - sol.achieved, sol.target)
        tiny = torch.finfo(sol.target.dtype).tiny
        sol.residual = torch.tensor(miss ** 0.5 / max(target ** 0.5, tiny), dtype=torch.float64)
        return sol

    def refine(self, sol: HalfLayerSolution) -> HalfLayerSolution:
        """:meth:`HalfLayerSystem.refine` (one float64 step, residual through ``A``), row-split."""
        if self._svd is not None or sol.thin is None:
            return sol
        Z, R, coef, bias = sol.thin
        f64 = torch.float64
        core = self.core.to(f64)
        coef, bias = coef.to(f64), bias.to(f64)
        r = Z.to(f64) - torch.addmm(bias, core, coef.mT)
        dcoef, dbias = self._coefficients(r, f64)
        out = self._finish(Z, R, (coef + dcoef).to(self.dtype), (bias + dbias).to(self.dtype))
        out.refined = True
        return out


def row_split_factory(comm: Comm):
    """A ``factor_half_layer`` replacement that builds :class:`RowSplitHalfLayer` systems, each
    owned by the least-loaded rank so far (cost ``m³`` for an ``m×m`` Gram; the same choice on
    every rank)."""
    load = [0.0] * comm.world

    def factor(features, config, linear=None, *, defer: bool = False):
        core = linear.core if linear is not None else features
        m = min(comm.n_total, core.shape[1] + 1)
        owner = min(range(comm.world), key=lambda r: (load[r], r))
        load[owner] += float(m) ** 3
        return RowSplitHalfLayer(features, config, linear, comm, owner)
    return factor


def resolve_row_split(systems: list[RowSplitHalfLayer], comm: Comm) -> None:
    """Factor every system on its owner (all owners at once) and classify them on every rank.

    Collectives: one all-reduce of the Cholesky directions ``x`` and one of the quadratic forms'
    partial sums (the rank test), one of the outcomes ``(finite, rank, method)``; a failure on an
    owner (non-finite Gram) is raised on every rank by :meth:`Comm.check`.
    """
    err = None
    try:
        for s in systems:
            if s.is_owner:
                s.factor_local()
    except Exception as e:  # noqa: BLE001 - raised on every rank by check()
        err = e
    comm.check(err)
    dev, f64 = comm.device, torch.float64
    sizes = [s.probe_size() for s in systems]
    xs = torch.zeros(sum(a for a, _ in sizes), dtype=f64, device=dev)
    pos = 0
    for s, (a, _) in zip(systems, sizes, strict=True):
        if s.is_owner and s._probe is not None:
            xs[pos:pos + a] = s._probe.to(f64)
        pos += a
    comm.all_reduce_sum(xs)
    parts, pos = [], 0
    for s, (a, _) in zip(systems, sizes, strict=True):
        parts.append(s.quadratic_part(xs[pos:pos + a]))
        pos += a
    quad = comm.all_reduce_sum(torch.cat(parts))
    outcome = torch.zeros(len(systems), 3, dtype=f64, device=dev)
    pos = 0
    try:
        for j, (s, (_, b)) in enumerate(zip(systems, sizes, strict=True)):
            q = quad[pos:pos + b]
            pos += b
            if not s.is_owner:
                continue
            g = s._gram
            ok, finite = (bool(v) for v in g.pending.tolist())
            if s._probe is not None:
                rq = q.square().sum() if s.side == "dual" else q[0]
                ok = ok and bool(rq > g.rank_rtol * g.K.diagonal().max())
            g.resolve(ok, finite)
            outcome[j] = torch.tensor([1.0, g.rank, _METHODS.index(g.method)], dtype=f64)
    except Exception as e:  # noqa: BLE001 - raised on every rank by check()
        err = e
    comm.check(err)
    comm.all_reduce_sum(outcome)
    for s, (_, rank, method) in zip(systems, outcome.tolist(), strict=True):
        s.rank, s.gram_method = int(rank), _METHODS[int(method)]
        s.full_rank = s.rank == s.n
        s.exact = s.full_rank and s.config.method != "damped"
