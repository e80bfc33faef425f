"""The per-block right inverse of a RevMLP's Jacobian (Buffelli et al., NeurIPS 2024, eqs. 16-17).

Let ``J = ∂F/∂θ`` for logits ``F = X^(L) U`` and let ``T`` (``n×C``) be an output-space target. We
find ``Δθ`` with ``J Δθ = T`` exactly, block by block, never forming ``J``:

1. **Readout.** ``E = T (UᵀU)⁻¹ Uᵀ`` is the minimum-norm pre-image of ``T`` under ``Z ↦ Z U``
   (the pseudo-inverse, so a ``U`` cast between dtypes does not cost exactness).
2. **Pull-back.** Blocks are invertible, so ``T_ℓ := ∂X^(L)/∂X^(ℓ)`` is invertible and the tangent
   ``E^(ℓ) = T_ℓ⁻¹ E`` is one inverse-JVP sweep:
   ``δX2 = E2 − J_g(Y1)[E1]``, ``δX1 = E1 − J_f(X2)[δX2]`` with ``J_f(Z)[V] = (σ'(Z C_f) ⊙ (V C_f)) W_fᵀ``.
   For a linear block ``J_f[V] = V (C_f W_fᵀ)``: one ``(d/2)×(d/2)`` matrix serves every product.
3. **Per-half-layer solves** for block ℓ with share ``w`` of the target:
   ``Δ_f = A_f⁺ (w E1^(ℓ))``;  ``m = J_g(Y1)[A_f Δ_f]`` (the *missing Jacobian*: the effect of
   ``ΔW_f`` on ``Y2``);  ``Δ_g = A_g⁺ (w E2^(ℓ) − m)``. With full-row-rank ``A_f``, ``A_g`` the block
   output changes by exactly ``w E^(ℓ)``, hence the net output by ``w E``. Each solve uses the
   cheapest exact method for its structure (:mod:`gnrev_plugin.optim.solvers`): the small
   ``[X̃, 1]`` factor of a linear half-layer, the ``n×n`` dual Gram when ``n ≤ M+1``, the
   ``(M+1)×(M+1)`` primal Gram when ``n > M+1``, pivoted QR on the smaller side for true rank loss.
4. **Shares.** Participating blocks get ``w = 1/|P|`` each, so ``Σ_ℓ`` gives ``E``. A block whose
   systems are rank-deficient (batch > M+1, a linear block with batch > d/2+1, duplicated samples)
   contributes only its least-squares part; its effect on the output is pushed forward by JVPs and
   the full-rank blocks share the rest equally. The step is exact whenever one block is full rank.
5. **Accuracy, checked.** Every system of an exact share must reproduce its target to
   ``‖E − AΔ‖ ≤ residual_rtol·‖E‖``, measured a posteriori from the update as applied (one host
   synchronisation for all systems). A miss gets one step of float64 iterative refinement; a
   block that still misses is treated like a rank-deficient one (least-squares role, the other
   blocks absorb its residual), so ``exact`` is never claimed for an inaccurate solve.

All block updates are computed from the current parameters before any is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat.torch import tensor_version
from ..nn.coupling import BlockActivations
from ..nn.revmlp import RevMLP
from .block_systems import (
    BlockSystems,
    FrozenBlockJacobian,
    LinearBlockActivations,
    is_linear_block,
    linear_block_forward,
    step_forward,
)
from .block_updates import (
    BlockReport,
    BlockUpdate,
    RightInverseResult,
    check_accuracy,
    param_jvp,
    solve_kind,
)
from .errors import RankDeficiencyError
from .solvers import SolverConfig, single_threaded

__all__ = ["BlockUpdate", "BlockReport", "RightInverseResult", "right_inverse",
           "pull_back_readout", "step_forward", "LinearBlockActivations", "is_linear_block",
           "linear_block_forward", "RANK_POLICIES"]

RANK_POLICIES = ("raise", "strict", "warn")


def _readout_pinv(model: RevMLP, cache: dict | None) -> torch.Tensor:
    """``U⁺ = (UᵀU)⁻¹Uᵀ`` (``C×d``) in float64, formed single-threaded and kept in ``cache``."""
    U = model.readout
    key = ("readout pinv", id(U), tensor_version(U), U.data_ptr())
    pinv = None if cache is None else cache.get(key)
    if pinv is None:
        U64 = U.to(torch.float64)
        with single_threaded():
            pinv = torch.linalg.solve(U64.mT @ U64, U64.mT)
        if cache is not None:
            cache[key] = pinv
    return pinv


def pull_back_readout(model: RevMLP, target: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    r"""The min-norm ``E`` with ``E U = T`` (``T`` itself without readout).

    .. math::

        E = T (U^T U)^{-1} U^T.

    Args:
        model: the RevMLP (its readout ``U``).
        target: the output-space target ``T``.
        cache: keeps ``U⁺`` between calls.

    Returns:
        ``E`` in ``target``'s dtype.
    """
    if model.readout is None:
        return target
    return (target.to(torch.float64) @ _readout_pinv(model, cache)).to(target.dtype)


def _solve_block(bs: BlockSystems, t: torch.Tensor, w: float, m_full: torch.Tensor,
                 exact_share: bool, f_factors: tuple | None = None) -> BlockUpdate:
    """Solve one block for ``w·t``; ``m_full = J_g[t1]`` from the pull-back.

    In an exact share ``A_f Δ_f = w t1`` (checked afterwards), so ``m = w m_full``; otherwise the
    missing Jacobian is taken of the change ``A_f Δ_f`` actually achieved. ``f_factors = (Z, R)``:
    ``t1 = Z R`` with a thin ``Z`` (the top block's target, pulled back through the readout).
    """
    t1, t2 = bs.block.split(t)
    if f_factors is None:
        sol_f = bs.f.solve(w * t1)
    else:
        sol_f = bs.f.solve(factors=(w * f_factors[0], f_factors[1]))
    m = w * m_full if exact_share else bs.jvp_g(sol_f.achieved)
    sol_g = bs.g.solve(w * t2 - m)
    sol_g.achieved = sol_g.achieved + m                       # total change of Y2
    return BlockUpdate(sol_f, sol_g, m)


def _sweep(jacs: list, E: torch.Tensor, solve_blocks: list[int], w: float,
           exact_share: bool, m_top: torch.Tensor | None = None,
           top_factors: tuple | None = None,
           ) -> tuple[dict[int, BlockUpdate], torch.Tensor]:
    """One inverse-JVP sweep from the output down to ``min(solve_blocks)``, solving on the way.

    ``jacs[ℓ]``: the block's :class:`BlockSystems` (participating) or :class:`FrozenBlockJacobian`.
    ``m_top``: ``J_g[E1]`` of the top block if already known; ``top_factors = (Z, R)`` with
    ``E = Z R`` (thin ``Z``). Returns the updates and the top block's ``J_g[E1]``.
    """
    updates: dict[int, BlockUpdate] = {}
    t = E
    lowest = min(solve_blocks)
    top = len(jacs) - 1
    for idx in range(top, lowest - 1, -1):
        bs = jacs[idx]
        t1, t2 = bs.block.split(t)
        if idx == top and m_top is not None:
            m_full = m_top
        elif idx == top and top_factors is not None:       # t1 = Z R₁ has rank C: thin first
            m_full = bs.jvp_g.low_rank(top_factors[0],      # product (n·C·M, not n·(d/2)·M)
                                       top_factors[1][:, :bs.block.half])
        else:
            m_full = bs.jvp_g(t1)
        if idx == top:
            m_top = m_full
        if idx in solve_blocks:
            if idx == top and top_factors is not None:
                Z, R = top_factors
                updates[idx] = _solve_block(bs, t, w, m_full, exact_share,
                                            (Z, R[:, :bs.block.half]))
            else:
                updates[idx] = _solve_block(bs, t, w, m_full, exact_share)
        if idx > lowest:
            d2 = t2 - m_full
            d1 = t1 - bs.jvp_f(d2)
            t = torch.cat([d1, d2], dim=-1)
    return updates, m_top


def _push_forward(model: RevMLP, jacs: list, updates: dict[int, BlockUpdate],
                  readout: torch.Tensor | None = None) -> torch.Tensor:
    """Output change ``Σ_ℓ T_ℓ r_ℓ`` at ``X^(L)`` of the blocks' achieved changes ``r_ℓ``, or with
    ``readout`` its image ``(Σ_ℓ T_ℓ r_ℓ) U`` (``n×C``; the top block's ``J_g`` then ends in the
    thin product ``J_g[·] U₂``)."""
    acc = None
    top = len(model.blocks) - 1
    for idx in range(len(model.blocks)):
        if acc is not None and idx == top and readout is not None:
            half = model.blocks[top].half
            v1, v2 = model.blocks[top].split(acc)
            d1 = v1 + jacs[top].jvp_f(v2)
            U1, U2 = readout[:half], readout[half:]
            acc = d1 @ U1 + v2 @ U2 + jacs[top].jvp_g.projected(d1, U2)
        elif acc is not None:
            acc = jacs[idx].jvp_input(acc)
        if idx in updates:
            u = updates[idx]
            r = torch.cat([u.f.achieved, u.g.achieved], dim=-1)
            if idx == top and readout is not None:
                r = r @ readout
            acc = r if acc is None else acc + r
    return acc


def _describe(systems: dict[int, BlockSystems], blocks: list[int], n: int) -> str:
    return "; ".join(f"block {i}: rank(A_f)={systems[i].f.rank}, rank(A_g)={systems[i].g.rank} "
                     f"of n={n}" for i in blocks)


def right_inverse(
    model: RevMLP,
    acts: list[BlockActivations | LinearBlockActivations],
    target: torch.Tensor,
    config: SolverConfig,
    blocks: list[int] | None = None,
    rank_policy: str = "raise",
    verify: bool = False,
    *,
    inputs: torch.Tensor | None = None,
    cache: dict | None = None,
    comm=None,
) -> RightInverseResult:
    r"""Compute :math:`\Delta\theta` with :math:`J \Delta\theta = \text{target}` for the participating
    ``blocks``.

    .. math::

        E = T U^+, \qquad Δ_f = A_f^+ (w E_1^{(ℓ)}), \qquad
        Δ_g = A_g^+ (w E_2^{(ℓ)} - J_g[A_f Δ_f]), \qquad w = 1/|P|.

    Args:
        model: the RevMLP, at the parameters where ``acts`` were recorded.
        acts: per-block activations from ``model.features_with_activations(x)`` or
            :func:`step_forward` (which gives linear blocks as :class:`LinearBlockActivations`).
        target: output-space target ``T`` shaped like ``model(x)``.
        config: the half-layer solver.
        blocks: indices of the blocks whose parameters change (default: all).
        rank_policy: ``"raise"`` if no participating block can take an exact share (full rank
            and accurate), ``"strict"`` if any system is rank-deficient or inaccurate,
            ``"warn"``: never raise (the caller warns when ``exact`` is False).
        verify: recompute ``J Δθ`` from ``Δθ`` and report the relative residual.
        inputs: the flattened model input ``X`` (``n×d``): a linear first block then factors
            through ``[X2 L_C, 1]`` directly (without it, through ``h Q_Cᵀ``).
        cache: a dict that keeps the projections' factors ``(L_C, Q_C)`` between calls.
        comm: a :class:`~gnrev_plugin.optim.distributed.Comm` (after its ``agree``): ``acts``,
            ``target`` and ``inputs`` are this rank's rows of the global batch and the systems
            are solved row-split (:mod:`gnrev_plugin.optim.distributed_solve`); every rank gets
            the same updates and report.

    Returns:
        The per-block updates, whether the step is exact, and one :class:`BlockReport` per
        participating block.

    Raises:
        RankDeficiencyError: as set by ``rank_policy``; nothing is changed.
    """
    if rank_policy not in RANK_POLICIES:
        raise ValueError(f"unknown rank_policy {rank_policy!r}; choose from {RANK_POLICIES}")
    P = sorted(range(len(model.blocks)) if blocks is None else blocks)
    if not P:
        raise ValueError("no block participates in the step")
    E = pull_back_readout(model, target, cache)
    systems = _factor_blocks(model, acts, P, config, inputs, cache, comm)
    jacs = [systems[i] if i in systems else FrozenBlockJacobian(b, acts[i])   # frozen blocks
            for i, b in enumerate(model.blocks)]                             # pass tangents
    n = target.shape[0] if comm is None else comm.n_total
    rank_deficient = [i for i in P if not systems[i].full_rank]
    if rank_deficient and rank_policy == "strict":
        raise RankDeficiencyError(
            f"rank-deficient Gauss-Newton systems ({_describe(systems, rank_deficient, n)}); with "
            "rank_policy='strict' every per-layer system must have full row rank (needs batch ≤ "
            "M+1, and ≤ d/2+1 for a linear block, and no duplicated samples)")
    ctx = _StepContext(model, jacs, systems, E, target, _thin_readout(model, target, config, cache),
                       cache)
    updates, full, residuals, demoted = _solve_with_demotion(ctx, P, rank_policy, n)
    exact = bool(full) and all(systems[i].f.exact and systems[i].g.exact for i in full)
    reports = [_report(i, n, systems[i], updates[i], i in full, residuals[i], i not in demoted)
               for i in P]
    result = RightInverseResult(updates, exact, reports,
                                residual_rtol=systems[P[0]].f.residual_rtol)
    if verify:
        result.relative_residual = _relative_residual(model, acts, result.updates, target, comm)
    return result


def _report(i: int, n: int, system, update, full: bool, residuals, accurate: bool) -> BlockReport:
    """Block ``i``'s :class:`BlockReport` from its systems and its update."""
    return BlockReport(i, n, system.f.rank, system.g.rank, system.full_rank,
                       "exact share" if full else "least squares",
                       solve_kind(system.f), solve_kind(system.g), *residuals,
                       accurate=accurate, refined=update.f.refined or update.g.refined)


def _relative_residual(model: RevMLP, acts, updates, target: torch.Tensor, comm) -> float:
    r""":math:`\lVert J\Delta\theta - T\rVert / \lVert T\rVert`, recomputed by a parameter JVP
    (summed over the ranks' rows under ``comm``)."""
    got = param_jvp(model, acts, updates)
    if comm is None:
        miss, norm = float((got - target).norm()), float(target.norm())
    else:
        miss, norm = (v ** 0.5 for v in comm.sum_squares(got - target, target))
    return miss / max(norm, 1e-300)


def _factor_blocks(model: RevMLP, acts: list, P: list[int], config: SolverConfig,
                   inputs: torch.Tensor | None, cache: dict | None, comm=None
                   ) -> dict[int, BlockSystems]:
    """The participating blocks' systems, classified (full rank or not) with one host
    synchronisation for all of them (row-split over ``comm``'s ranks when given)."""
    if comm is not None:
        from .distributed_solve import resolve_row_split, row_split_factory

        factor = row_split_factory(comm)
        systems = {i: BlockSystems(model, i, acts[i], config, inputs, cache, factor) for i in P}
        resolve_row_split([s for i in P for s in (systems[i].f, systems[i].g)], comm)
        return systems
    systems = {i: BlockSystems(model, i, acts[i], config, inputs, cache) for i in P}
    pending = [s for i in P for s in (systems[i].f, systems[i].g) if s.pending is not None]
    if pending:
        for s, flags in zip(pending, torch.stack([s.pending for s in pending]).tolist(),
                            strict=True):
            s.resolve(*flags)
    return systems


def _thin_readout(model: RevMLP, target: torch.Tensor, config: SolverConfig,
                  cache: dict | None) -> torch.Tensor | None:
    """``U⁺`` when the top block's first system should solve on the ``C`` columns of ``T`` and
    expand by ``U⁺`` (a target pulled back through the readout is ``E = T U⁺``; worth it when
    ``C ≪ d/2``), else ``None``."""
    if model.readout is not None and 4 * model.readout.shape[1] <= model.blocks[-1].half \
            and config.method != "svd":
        return _readout_pinv(model, cache).to(target.dtype)
    return None


@dataclass


class _StepContext:
    """What every attempt of one right-inverse step shares."""

    model: RevMLP
    jacs: list
    systems: dict[int, BlockSystems]
    E: torch.Tensor
    target: torch.Tensor
    thin: torch.Tensor | None
    cache: dict | None


def _solve_with_demotion(ctx: _StepContext, P: list[int], rank_policy: str, n: int) -> tuple:
    """Solve, check every exact share's accuracy, and demote the blocks that miss it (even after
    refinement) to the least-squares role until the exact shares all pass.

    Returns ``(updates, full, residuals, demoted)``: the updates, the exact-share blocks, the
    residuals of all blocks and the demoted blocks' residuals.
    """
    systems = ctx.systems
    demoted: dict[int, tuple[float, float]] = {}     # full rank, but inaccurate even refined
    while True:
        full = [i for i in P if systems[i].full_rank and i not in demoted]
        deficient = [i for i in P if i not in full]
        if deficient and not full and rank_policy == "raise":
            _raise_no_exact_block(systems, deficient, demoted, n)
        if not deficient or not full:
            updates = _solve_equal_shares(ctx, P, exact_share=not deficient)
        else:
            updates = _solve_least_squares_then_rest(ctx, P, full, deficient)
        failing, residuals = check_accuracy(systems, updates, P, full)
        if not failing:
            return updates, full, residuals, demoted
        if rank_policy == "strict":
            raise RankDeficiencyError(
                "numerically rank-deficient Gauss-Newton systems: " + "; ".join(
                    f"block {i}: relative residuals {rf:.1e} / {rg:.1e} > "
                    f"{systems[i].f.residual_rtol:.0e} after refinement"
                    for i, (rf, rg) in failing.items()))
        demoted.update(failing)


def _raise_no_exact_block(systems: dict[int, BlockSystems], deficient: list[int],
                          demoted: dict[int, tuple[float, float]], n: int) -> None:
    """Raise the :class:`RankDeficiencyError` of ``rank_policy="raise"`` when no block can take an
    exact share (rank-deficient, or demoted for inaccuracy)."""
    why = _describe(systems, [i for i in deficient if i not in demoted], n)
    if demoted:
        why = "; ".join(filter(None, [why] + [
            f"block {i}: relative residuals {rf:.1e} / {rg:.1e} > "
            f"{systems[i].f.residual_rtol:.0e} after refinement (numerically "
            "rank-deficient Gram)" for i, (rf, rg) in demoted.items()]))
    raise RankDeficiencyError(
        f"no block can reproduce the target exactly ({why}), so J Δθ = target has no "
        "exact per-block solution. Use a batch ≤ M+1 without duplicated samples, or "
        "rank_policy='warn' to take the least-squares step")


def _solve_equal_shares(ctx: _StepContext, P: list[int], exact_share: bool
                        ) -> dict[int, BlockUpdate]:
    """Every block in ``P`` solves for ``w = 1/|P|`` of ``E``: all exact shares (all full rank)
    or all least squares (none is)."""
    top = None if ctx.thin is None else (ctx.target, ctx.thin)
    return _sweep(ctx.jacs, ctx.E, P, 1.0 / len(P), exact_share=exact_share, top_factors=top)[0]


def _solve_least_squares_then_rest(ctx: _StepContext, P: list[int], full: list[int],
                                   deficient: list[int]) -> dict[int, BlockUpdate]:
    r"""The rank-deficient blocks take their least-squares part ``a`` of ``1/|P|`` of the target;
    the full-rank blocks share the remainder exactly:

    .. math::

        E_{rem} = (T - a U) U^+ = E - (a U) U^+, \qquad w = 1/|\mathrm{full}|.

    The top block's ``J_g[E_rem,1]`` is ``J_g[E1]`` (from the first sweep) minus ``J_g`` of a
    rank-``C`` correction (a thin first product).
    """
    model, target, thin = ctx.model, ctx.target, ctx.thin
    ls, m_top = _sweep(ctx.jacs, ctx.E, deficient, 1.0 / len(P), exact_share=False,
                       top_factors=None if thin is None else (target, thin))
    rest = None
    if model.readout is None:
        E_rem, m_top = target - _push_forward(model, ctx.jacs, ls), None
    else:
        Z = _push_forward(model, ctx.jacs, ls, model.readout)
        E_rem = pull_back_readout(model, target - Z, ctx.cache)
        half = model.blocks[-1].half
        Ub = _readout_pinv(model, ctx.cache)[:, :half].to(Z.dtype)
        m_top = m_top - ctx.jacs[-1].jvp_g.low_rank(Z, Ub)
        rest = None if thin is None else (target - Z, thin)
    return {**ls, **_sweep(ctx.jacs, E_rem, full, 1.0 / len(full), True, m_top, rest)[0]}
