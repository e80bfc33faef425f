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

from dataclasses import asdict, dataclass, field

import torch

from ..nn.coupling import AdditiveCoupling, BlockActivations, CouplingFunction
from ..nn.revmlp import RevMLP
from .errors import RankDeficiencyError
from .solvers import (
    HalfLayerSolution,
    HalfLayerSystem,
    LinearFactor,
    SolverConfig,
    factor_half_layer,
    projection_factor,
    single_threaded,
)

__all__ = ["BlockUpdate", "BlockReport", "RightInverseResult", "right_inverse",
           "pull_back_readout", "step_forward", "LinearBlockActivations", "RANK_POLICIES"]

RANK_POLICIES = ("raise", "strict", "warn")


@dataclass
class BlockUpdate:
    """``(ΔW_f, Δb_f, ΔW_g, Δb_g)`` of one block, in the layout of its ``nn.Linear`` parameters."""

    f: HalfLayerSolution
    g: HalfLayerSolution
    #: the missing-Jacobian term ``m = J_g[A_f Δ_f]`` included in ``g.achieved``
    m: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.f.weight, self.f.bias, self.g.weight, self.g.bias]


@dataclass
class BlockReport:
    """Ranks of one block's systems, how they were solved and the role the block played.

    ``role``: ``"exact share"`` or ``"least squares"`` (``"frozen"`` blocks are not reported).
    ``kind_f``/``kind_g``: the solve (``"dual"``, ``"primal"``, ``"linear dual"``,
    ``"linear primal"``, ``"svd"``), with ``" + qrcp"`` when the Gram needed the rank-revealing
    factorisation. ``residual_f``/``residual_g``: relative residual ``‖E − AΔ‖/‖E‖`` of each
    solve (for a least-squares system, the part of its target outside the range of ``A``).
    ``accurate``: every system of an exact share met ``residual_rtol`` (``refined``: after one
    float64 refinement step); ``False`` for a full-rank block demoted to least squares.
    """

    block: int
    n: int
    rank_f: int
    rank_g: int
    full_rank: bool
    role: str  # "exact share", "least squares", "frozen"
    kind_f: str = ""
    kind_g: str = ""
    residual_f: float | None = None
    residual_g: float | None = None
    accurate: bool = True
    refined: bool = False


@dataclass
class RightInverseResult:
    updates: dict[int, BlockUpdate]
    exact: bool
    blocks: list[BlockReport] = field(default_factory=list)
    relative_residual: float | None = None
    residual_rtol: float | None = None

    def report(self) -> dict:
        return {"exact": self.exact, "blocks": [asdict(b) for b in self.blocks],
                "relative_residual": self.relative_residual,
                "residual_rtol": self.residual_rtol}


def _readout_pinv(model: RevMLP, cache: dict | None) -> torch.Tensor:
    """``U⁺ = (UᵀU)⁻¹Uᵀ`` (``C×d``) in float64, formed single-threaded and kept in ``cache``."""
    U = model.readout
    key = ("readout pinv", id(U), U._version, U.data_ptr())
    pinv = None if cache is None else cache.get(key)
    if pinv is None:
        U64 = U.to(torch.float64)
        with single_threaded():
            pinv = torch.linalg.solve(U64.mT @ U64, U64.mT)
        if cache is not None:
            cache[key] = pinv
    return pinv


def pull_back_readout(model: RevMLP, target: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """``E = T (UᵀU)⁻¹ Uᵀ`` (or ``T`` without readout): the min-norm ``E`` with ``E U = T``."""
    if model.readout is None:
        return target
    return (target.to(torch.float64) @ _readout_pinv(model, cache)).to(target.dtype)


# ------------------------------------------------------------------------------ block systems
class _HalfJac:
    """``J(Z)[V] = (σ'(h) ⊙ (V C)) Wᵀ`` of one half-layer at ``h = Z C`` (its ``jvp_input``), or
    ``V P`` with ``P = C Wᵀ`` for a linear one.

    ``σ'(h)`` is formed once per step and reused by every product (a block's ``J_g`` is applied
    up to three times). For ReLU ``σ'(h) = max(sign h, 0)``, applied as a product: exact (the
    factor is 0 or 1) and on this CPU build ~15× faster than ``masked_fill_`` (1.2 ms vs 19 ms
    for 1000×2000).
    """

    def __init__(self, fn: CouplingFunction, h: torch.Tensor | None,
                 P: torch.Tensor | None = None) -> None:
        self.fn, self.h, self.P = fn, h, P
        self._deriv = None

    def _back(self, vc: torch.Tensor) -> torch.Tensor:
        act = self.fn.activation
        if not act.is_linear:
            if self._deriv is None:
                self._deriv = (torch.sign(self.h).clamp_(min=0) if act.name == "relu"
                               else act.derivative(self.h))
            vc.mul_(self._deriv)
        return vc @ self.fn.linear.weight.mT

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.P is not None:
            return v @ self.P
        return self._back(v @ self.fn.projection)

    def low_rank(self, Z: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``J[Z B]`` for a thin ``Z`` (``n×c``): the first product costs ``n c M``, not
        ``n (d/2) M``."""
        if self.P is not None:
            return Z @ (B @ self.P)
        return self._back(Z @ (B @ self.fn.projection))


class LinearBlockActivations:
    """A linear block's activations (``σ`` = identity in both halves) from the cheap forward
    ``Y1 = X1 + X2 P_f + b_f``, ``Y2 = X2 + Y1 P_g + b_g`` with ``P = C Wᵀ`` (``(d/2)×(d/2)``).

    Its GN systems factor through ``[X2 L_C, 1]`` and ``[Y1 L_C, 1]`` and its input JVPs are
    ``V P``, so the ``n×M`` features ``h = s = X C`` are formed only on demand (verification, the
    ``svd`` solver, a projection without full row rank).
    """

    def __init__(self, block: AdditiveCoupling, x2: torch.Tensor, y1: torch.Tensor,
                 P_f: torch.Tensor, P_g: torch.Tensor) -> None:
        self.block, self.x2, self.y1, self.P_f, self.P_g = block, x2, y1, P_f, P_g
        self._h_f = self._h_g = None

    @property
    def h_f(self) -> torch.Tensor:
        if self._h_f is None:
            self._h_f = self.x2 @ self.block.f.projection
        return self._h_f

    @property
    def h_g(self) -> torch.Tensor:
        if self._h_g is None:
            self._h_g = self.y1 @ self.block.g.projection
        return self._h_g

    s_f = h_f
    s_g = h_g


def is_linear_block(block: AdditiveCoupling) -> bool:
    return block.f.activation.is_linear and block.g.activation.is_linear


def linear_block_forward(block: AdditiveCoupling, z: torch.Tensor
                         ) -> tuple[torch.Tensor, LinearBlockActivations]:
    """``[Y1, Y2]`` of a linear block through ``P_f = C_f W_fᵀ``, ``P_g = C_g W_gᵀ``: two
    ``(d/2)²M`` products instead of four ``n (d/2) M`` ones."""
    P_f = block.f.projection @ block.f.weight.mT
    P_g = block.g.projection @ block.g.weight.mT
    x1, x2 = block.split(z)
    y1 = torch.addmm(block.f.bias, x2, P_f).add_(x1)
    y2 = torch.addmm(block.g.bias, y1, P_g).add_(x2)
    return torch.cat([y1, y2], dim=-1), LinearBlockActivations(block, x2, y1, P_f, P_g)


def step_forward(model: RevMLP, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``X^(L)`` and per-block activations for the explicit step: linear blocks through
    :func:`linear_block_forward`, the others through their ``forward_with_activations``."""
    z = x.reshape(x.shape[0], -1)
    acts = []
    for block in model.blocks:
        if is_linear_block(block):
            z, a = linear_block_forward(block, z)
        else:
            z, a = block.forward_with_activations(z)
        acts.append(a)
    return z, acts


class _BlockSystems:
    """The two factored systems of one block and its input-Jacobian products.

    For a linear block ``J_f[V] = V P_f`` with ``P_f = C_f W_fᵀ`` (``(d/2)×(d/2)``), built once per
    step, and the systems factor through ``[X L_C, 1]``; otherwise the block's own features and
    ``(σ' ⊙ (V C)) Wᵀ``.
    """

    def __init__(self, model: RevMLP, idx: int, acts, config: SolverConfig,
                 inputs: torch.Tensor | None, cache: dict | None) -> None:
        block: AdditiveCoupling = model.blocks[idx]
        self.block = block
        self.P_f = self.P_g = None
        linear = is_linear_block(block)
        if linear and not isinstance(acts, LinearBlockActivations) and idx == 0 \
                and inputs is not None:
            acts = linear_block_forward(block, inputs)[1]     # X2, Y1 of the recorded batch
        self.acts = acts
        factors = [None, None]
        if linear:
            if isinstance(acts, LinearBlockActivations):
                self.P_f, self.P_g = acts.P_f, acts.P_g
                inner = (acts.x2, acts.y1)
            else:
                self.P_f = block.f.projection @ block.f.weight.mT
                self.P_g = block.g.projection @ block.g.weight.mT
                inner = (None, None)
            k = block.half
            for j, (fn, h) in enumerate(((block.f, "h_f"), (block.g, "h_g"))):
                if config.method == "svd" or 2 * k > fn.projection.shape[1]:
                    continue
                fac = projection_factor(fn.projection, fn.weight.dtype, cache)
                if fac is None:
                    continue
                L, Q = fac
                core = inner[j] @ L if inner[j] is not None else getattr(acts, h) @ Q.mT
                factors[j] = LinearFactor(core, Q)                 # X̃ = X L_C  (= h Q_Cᵀ)
        self.f = factor_half_layer(None if factors[0] else acts.s_f, config, factors[0],
                                   defer=True)
        self.g = factor_half_layer(None if factors[1] else acts.s_g, config, factors[1],
                                   defer=True)
        self.jvp_f = _HalfJac(block.f, None if linear else acts.h_f, self.P_f)
        self.jvp_g = _HalfJac(block.g, None if linear else acts.h_g, self.P_g)

    @property
    def full_rank(self) -> bool:
        return self.f.full_rank and self.g.full_rank

    def jvp_input(self, v: torch.Tensor) -> torch.Tensor:
        """``δY1 = δX1 + J_f[δX2]``, ``δY2 = δX2 + J_g[δY1]``."""
        v1, v2 = self.block.split(v)
        d1 = v1 + self.jvp_f(v2)
        return torch.cat([d1, v2 + self.jvp_g(d1)], dim=-1)


def _solve_block(bs: _BlockSystems, t: torch.Tensor, w: float, m_full: torch.Tensor,
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

    ``jacs[ℓ]``: the block's :class:`_BlockSystems` (participating) or :class:`_GenericJac`.
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
        m_full = m_top if (idx == top and m_top is not None) else bs.jvp_g(t1)
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


class _GenericJac:
    """Input-Jacobian products of a block that takes no part in the step (frozen)."""

    def __init__(self, block: AdditiveCoupling, acts) -> None:
        self.block, self.acts = block, acts
        if isinstance(acts, LinearBlockActivations):
            self.jvp_f = _HalfJac(block.f, None, acts.P_f)
            self.jvp_g = _HalfJac(block.g, None, acts.P_g)
        else:
            self.jvp_f = _HalfJac(block.f, acts.h_f)
            self.jvp_g = _HalfJac(block.g, acts.h_g)

    def jvp_input(self, v):
        v1, v2 = self.block.split(v)
        d1 = v1 + self.jvp_f(v2)
        return torch.cat([d1, v2 + self.jvp_g(d1)], dim=-1)


def _push_forward(model: RevMLP, jacs: list, updates: dict[int, BlockUpdate]) -> torch.Tensor:
    """Output change ``Σ_ℓ T_ℓ r_ℓ`` at ``X^(L)`` of the blocks' achieved changes ``r_ℓ``."""
    acc = None
    for idx in range(len(model.blocks)):
        if acc is not None:
            acc = jacs[idx].jvp_input(acc)
        if idx in updates:
            u = updates[idx]
            r = torch.cat([u.f.achieved, u.g.achieved], dim=-1)
            acc = r if acc is None else acc + r
    return acc


def _param_jvp(model: RevMLP, acts: list[BlockActivations],
               updates: dict[int, BlockUpdate]) -> torch.Tensor:
    """Independent check: ``J Δθ`` in output space recomputed from ``ΔW, Δb`` themselves, with the
    blocks' own generic JVPs (no solver bookkeeping, no structured shortcut)."""
    acc = None
    for idx, block in enumerate(model.blocks):
        a = acts[idx]
        if acc is not None:
            acc = block.jvp_input(a, acc)
        if idx in updates:
            u = updates[idx]
            d1 = a.s_f @ u.f.weight.mT + u.f.bias
            d2 = block.g.jvp_input(a.h_g, d1) + a.s_g @ u.g.weight.mT + u.g.bias
            r = torch.cat([d1, d2], dim=-1)
            acc = r if acc is None else acc + r
    return acc if model.readout is None else acc @ model.readout


def _describe(systems: dict[int, _BlockSystems], blocks: list[int], n: int) -> str:
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
) -> RightInverseResult:
    """Compute ``Δθ`` with ``J Δθ = target`` for the participating ``blocks`` (module docstring).

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

    Raises:
        RankDeficiencyError: as set by ``rank_policy``; nothing is changed.
    """
    if rank_policy not in RANK_POLICIES:
        raise ValueError(f"unknown rank_policy {rank_policy!r}; choose from {RANK_POLICIES}")
    P = sorted(range(len(model.blocks)) if blocks is None else blocks)
    if not P:
        raise ValueError("no block participates in the step")
    E = pull_back_readout(model, target, cache)
    systems = {i: _BlockSystems(model, i, acts[i], config, inputs, cache) for i in P}
    pending = [s for i in P for s in (systems[i].f, systems[i].g) if s.pending is not None]
    if pending:                                  # one host synchronisation classifies them all
        for s, flags in zip(pending, torch.stack([s.pending for s in pending]).tolist(),
                            strict=True):
            s.resolve(*flags)
    jacs = [systems[i] if i in systems else _GenericJac(b, acts[i])   # frozen blocks pass
            for i, b in enumerate(model.blocks)]                      # tangents through
    n = target.shape[0]
    rank_deficient = [i for i in P if not systems[i].full_rank]
    if rank_deficient and rank_policy == "strict":
        raise RankDeficiencyError(
            f"rank-deficient Gauss-Newton systems ({_describe(systems, rank_deficient, n)}); with "
            "rank_policy='strict' every per-layer system must have full row rank (needs batch ≤ "
            "M+1, and ≤ d/2+1 for a linear block, and no duplicated samples)")

    # A target pulled back through the readout is E = T U⁺: the top block's first system solves
    # on the C columns of T and expands by U⁺ (worth it when C ≪ d/2).
    thin = None
    if model.readout is not None and 4 * model.readout.shape[1] <= model.blocks[-1].half \
            and config.method != "svd":
        thin = _readout_pinv(model, cache).to(target.dtype)
    demoted: dict[int, tuple[float, float]] = {}     # full rank, but inaccurate even refined
    while True:
        full = [i for i in P if systems[i].full_rank and i not in demoted]
        deficient = [i for i in P if i not in full]
        if deficient and not full and rank_policy == "raise":
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
        if not deficient or not full:
            updates = _sweep(jacs, E, P, 1.0 / len(P), exact_share=not deficient,
                             top_factors=None if thin is None else (target, thin))[0]
        else:
            ls, m_top = _sweep(jacs, E, deficient, 1.0 / len(P), exact_share=False,
                               top_factors=None if thin is None else (target, thin))
            a = _push_forward(model, jacs, ls)
            rest = None
            if model.readout is None:
                E_rem, m_top = target - a, None
            else:
                # E_rem = (T − aU)U⁺ = E − (aU)U⁺: the top block's J_g[E_rem,1] is J_g[E1] (from
                # the first sweep) minus J_g of a rank-C correction (a thin first product).
                Z = a @ model.readout
                E_rem = pull_back_readout(model, target - Z, cache)
                half = model.blocks[-1].half
                Ub = _readout_pinv(model, cache)[:, :half].to(Z.dtype)
                m_top = m_top - jacs[-1].jvp_g.low_rank(Z, Ub)
                rest = None if thin is None else (target - Z, thin)
            updates = {**ls, **_sweep(jacs, E_rem, full, 1.0 / len(full), True, m_top,
                                      rest)[0]}
        failing, residuals = _check_accuracy(systems, updates, P, full)
        if not failing:
            break
        if rank_policy == "strict":
            raise RankDeficiencyError(
                "numerically rank-deficient Gauss-Newton systems: " + "; ".join(
                    f"block {i}: relative residuals {rf:.1e} / {rg:.1e} > "
                    f"{systems[i].f.residual_rtol:.0e} after refinement"
                    for i, (rf, rg) in failing.items()))
        demoted.update(failing)

    exact = bool(full) and all(systems[i].f.exact and systems[i].g.exact for i in full)
    reports = []
    for i in P:
        s, u = systems[i], updates[i]
        reports.append(BlockReport(
            i, n, s.f.rank, s.g.rank, s.full_rank,
            "exact share" if i in full else "least squares",
            _kind(s.f), _kind(s.g), *residuals[i],
            accurate=i not in demoted, refined=u.f.refined or u.g.refined))
    result = RightInverseResult(updates, exact, reports,
                                residual_rtol=systems[P[0]].f.residual_rtol)
    if verify:
        got = _param_jvp(model, acts, result.updates)
        result.relative_residual = float((got - target).norm()
                                         / target.norm().clamp_min(1e-300))
    return result


def _kind(system: HalfLayerSystem) -> str:
    return system.kind + (" + qrcp" if system.gram_method == "qrcp" else "")


def _check_accuracy(systems: dict[int, _BlockSystems], updates: dict[int, BlockUpdate],
                    blocks: list[int], full: list[int]
                    ) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
    """Read every system's relative residual (one host synchronisation); refine the misses of
    exact shares once in float64.

    Returns the exact-share blocks that still miss ``residual_rtol`` (with their residuals) and
    the residuals of all ``blocks`` after refinement.
    """
    values = torch.stack([r for i in blocks for r in (updates[i].f.residual,
                                                      updates[i].g.residual)]).tolist()
    residuals = {i: (values[2 * j], values[2 * j + 1]) for j, i in enumerate(blocks)}
    failing: dict[int, tuple[float, float]] = {}
    for i in full:
        s, u = systems[i], updates[i]
        tol = s.f.residual_rtol
        rf, rg = residuals[i]
        if rf <= tol and rg <= tol:
            continue
        if rf > tol:
            u.f = s.f.refine(u.f)
            rf = float(u.f.residual)
        if rg > tol:
            u.g = s.g.refine(u.g)
            if u.m is not None:
                u.g.achieved = u.g.achieved + u.m
            rg = float(u.g.residual)
        residuals[i] = (rf, rg)
        if rf > tol or rg > tol:
            failing[i] = (rf, rg)
    return failing, residuals
