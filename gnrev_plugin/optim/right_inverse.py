"""The per-block right inverse of a RevMLP's Jacobian (Buffelli et al., NeurIPS 2024, eqs. 16-17).

Let ``J = ∂F/∂θ`` for logits ``F = X^(L) U`` and let ``T`` (``n×C``) be an output-space target. We
find ``Δθ`` with ``J Δθ = T`` exactly, block by block, never forming ``J``:

1. **Readout.** ``E = T (UᵀU)⁻¹ Uᵀ`` is the minimum-norm pre-image of ``T`` under ``Z ↦ Z U``
   (the pseudo-inverse, so a ``U`` cast between dtypes does not cost exactness).
2. **Pull-back.** Blocks are invertible, so ``T_ℓ := ∂X^(L)/∂X^(ℓ)`` is invertible and the tangent
   ``E^(ℓ) = T_ℓ⁻¹ E`` is one inverse-JVP sweep:
   ``δX2 = E2 − J_g(Y1)[E1]``, ``δX1 = E1 − J_f(X2)[δX2]`` with ``J_f(Z)[V] = (σ'(Z C_f) ⊙ (V C_f)) W_fᵀ``.
3. **Per-half-layer solves** for block ℓ with share ``w`` of the target:
   ``Δ_f = A_f⁺ (w E1^(ℓ))``;  ``m = J_g(Y1)[A_f Δ_f]`` (the *missing Jacobian*: the effect of
   ``ΔW_f`` on ``Y2``);  ``Δ_g = A_g⁺ (w E2^(ℓ) − m)``. With full-row-rank ``A_f``, ``A_g`` the block
   output changes by exactly ``w E^(ℓ)``, hence the net output by ``w E``.
4. **Shares.** Participating blocks get ``w = 1/|P|`` each, so ``Σ_ℓ`` gives ``E``. A block whose
   systems are rank-deficient (batch > M+1, a linear block with batch > d/2+1, duplicated samples)
   contributes only its least-squares part; its effect on the output is pushed forward by JVPs and
   the full-rank blocks share the rest equally. The step is exact whenever one block is full rank.

All block updates are computed from the current parameters before any is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..nn.coupling import AdditiveCoupling, BlockActivations
from ..nn.revmlp import RevMLP
from .errors import RankDeficiencyError
from .solvers import HalfLayerSolution, HalfLayerSystem, SolverConfig, factor_half_layer

__all__ = ["BlockUpdate", "BlockReport", "RightInverseResult", "right_inverse",
           "pull_back_readout", "RANK_POLICIES"]

RANK_POLICIES = ("raise", "strict", "warn")


@dataclass
class BlockUpdate:
    """``(ΔW_f, Δb_f, ΔW_g, Δb_g)`` of one block, in the layout of its ``nn.Linear`` parameters."""

    f: HalfLayerSolution
    g: HalfLayerSolution

    def tensors(self) -> list[torch.Tensor]:
        return [self.f.weight, self.f.bias, self.g.weight, self.g.bias]


@dataclass
class BlockReport:
    """Ranks of one block's systems and the role it played in the step."""

    block: int
    n: int
    rank_f: int
    rank_g: int
    full_rank: bool
    role: str  # "exact share", "least squares", "frozen"


@dataclass
class RightInverseResult:
    updates: dict[int, BlockUpdate]
    exact: bool
    blocks: list[BlockReport] = field(default_factory=list)
    relative_residual: float | None = None

    def report(self) -> dict:
        return {"exact": self.exact, "blocks": [asdict(b) for b in self.blocks],
                "relative_residual": self.relative_residual}


def pull_back_readout(model: RevMLP, target: torch.Tensor) -> torch.Tensor:
    """``E = T (UᵀU)⁻¹ Uᵀ`` (or ``T`` without readout): the min-norm ``E`` with ``E U = T``."""
    U = model.readout
    if U is None:
        return target
    U64 = U.to(torch.float64)
    pinv = torch.linalg.solve(U64.mT @ U64, U64.mT)          # (C, d)
    return (target.to(torch.float64) @ pinv).to(target.dtype)


def _solve_block(block: AdditiveCoupling, acts: BlockActivations, sys_f: HalfLayerSystem,
                 sys_g: HalfLayerSystem, t: torch.Tensor, w: float,
                 m_full: torch.Tensor) -> BlockUpdate:
    t1, t2 = block.split(t)
    sol_f = sys_f.solve(w * t1)
    if sys_f.full_rank:
        m = w * m_full                                       # J_g[A_f Δ_f] = J_g[w t1]
    else:
        m = block.g.jvp_input(acts.h_g, sol_f.achieved)
    sol_g = sys_g.solve(w * t2 - m)
    sol_g.achieved = sol_g.achieved + m                       # total change of Y2
    return BlockUpdate(sol_f, sol_g)


def _sweep(model: RevMLP, acts: list[BlockActivations], E: torch.Tensor,
           systems: dict[int, tuple[HalfLayerSystem, HalfLayerSystem]],
           solve_blocks: list[int], w: float) -> dict[int, BlockUpdate]:
    """One inverse-JVP sweep from the output down to ``min(solve_blocks)``, solving on the way."""
    updates: dict[int, BlockUpdate] = {}
    t = E
    lowest = min(solve_blocks)
    for idx in range(len(model.blocks) - 1, lowest - 1, -1):
        block, a = model.blocks[idx], acts[idx]
        t1, t2 = block.split(t)
        m_full = block.g.jvp_input(a.h_g, t1)
        if idx in solve_blocks:
            updates[idx] = _solve_block(block, a, *systems[idx], t, w, m_full)
        if idx > lowest:
            d2 = t2 - m_full
            d1 = t1 - block.f.jvp_input(a.h_f, d2)
            t = torch.cat([d1, d2], dim=-1)
    return updates


def _push_forward(model: RevMLP, acts: list[BlockActivations],
                  updates: dict[int, BlockUpdate]) -> torch.Tensor:
    """Output change ``Σ_ℓ T_ℓ r_ℓ`` at ``X^(L)`` of the blocks' achieved changes ``r_ℓ``."""
    acc = None
    for idx, block in enumerate(model.blocks):
        if acc is not None:
            acc = block.jvp_input(acts[idx], acc)
        if idx in updates:
            u = updates[idx]
            r = torch.cat([u.f.achieved, u.g.achieved], dim=-1)
            acc = r if acc is None else acc + r
    return acc


def _param_jvp(model: RevMLP, acts: list[BlockActivations],
               updates: dict[int, BlockUpdate]) -> torch.Tensor:
    """Independent check: ``J Δθ`` in output space recomputed from ``ΔW, Δb`` themselves."""
    recomputed = {}
    for idx, u in updates.items():
        a, block = acts[idx], model.blocks[idx]
        d1 = a.s_f @ u.f.weight.mT + u.f.bias
        d2 = block.g.jvp_input(a.h_g, d1) + a.s_g @ u.g.weight.mT + u.g.bias
        recomputed[idx] = BlockUpdate(HalfLayerSolution(u.f.weight, u.f.bias, d1),
                                      HalfLayerSolution(u.g.weight, u.g.bias, d2))
    z = _push_forward(model, acts, recomputed)
    return z if model.readout is None else z @ model.readout


def right_inverse(
    model: RevMLP,
    acts: list[BlockActivations],
    target: torch.Tensor,
    config: SolverConfig,
    blocks: list[int] | None = None,
    rank_policy: str = "raise",
    verify: bool = False,
) -> RightInverseResult:
    """Compute ``Δθ`` with ``J Δθ = target`` for the participating ``blocks`` (module docstring).

    Args:
        model: the RevMLP, at the parameters where ``acts`` were recorded.
        acts: per-block activations from ``model.features_with_activations(x)``.
        target: output-space target ``T`` shaped like ``model(x)``.
        config: the half-layer solver.
        blocks: indices of the blocks whose parameters change (default: all).
        rank_policy: ``"raise"`` if no participating block is full rank, ``"strict"`` if any is
            rank-deficient, ``"warn"``: never raise (the caller warns when ``exact`` is False).
        verify: recompute ``J Δθ`` from ``Δθ`` and report the relative residual.

    Raises:
        RankDeficiencyError: as set by ``rank_policy``; nothing is changed.
    """
    if rank_policy not in RANK_POLICIES:
        raise ValueError(f"unknown rank_policy {rank_policy!r}; choose from {RANK_POLICIES}")
    P = sorted(range(len(model.blocks)) if blocks is None else blocks)
    if not P:
        raise ValueError("no block participates in the step")
    E = pull_back_readout(model, target)
    systems = {i: (factor_half_layer(acts[i].s_f, config), factor_half_layer(acts[i].s_g, config))
               for i in P}
    full = [i for i in P if systems[i][0].full_rank and systems[i][1].full_rank]
    deficient = [i for i in P if i not in full]
    n = target.shape[0]

    def describe() -> str:
        return "; ".join(f"block {i}: rank(A_f)={systems[i][0].rank}, rank(A_g)="
                         f"{systems[i][1].rank} of n={n}" for i in deficient)

    if deficient and rank_policy == "strict":
        raise RankDeficiencyError(
            f"rank-deficient Gauss-Newton systems ({describe()}); with rank_policy='strict' every "
            "per-layer system must have full row rank (needs batch ≤ M+1, and ≤ d/2+1 for a linear "
            "block, and no duplicated samples)")
    if deficient and not full and rank_policy == "raise":
        raise RankDeficiencyError(
            f"no block can reproduce the target exactly ({describe()}), so J Δθ = target has no "
            "exact per-block solution. Use a batch ≤ M+1 without duplicated samples, or "
            "rank_policy='warn' to take the least-squares step")

    if not deficient or not full:
        updates = _sweep(model, acts, E, systems, P, 1.0 / len(P))
    else:
        ls = _sweep(model, acts, E, systems, deficient, 1.0 / len(P))
        a = _push_forward(model, acts, ls)
        achieved_out = a if model.readout is None else a @ model.readout
        E_rem = pull_back_readout(model, target - achieved_out)
        updates = {**ls, **_sweep(model, acts, E_rem, systems, full, 1.0 / len(full))}
    roles = {i: ("exact share" if i in full else "least squares") for i in P}

    exact = bool(full) and all(systems[i][0].exact and systems[i][1].exact for i in full)
    reports = [BlockReport(i, n, systems[i][0].rank, systems[i][1].rank, i in full, roles[i])
               for i in P]
    result = RightInverseResult(updates, exact, reports)
    if verify:
        got = _param_jvp(model, acts, updates)
        result.relative_residual = float((got - target).norm() / target.norm().clamp_min(1e-300))
    return result
