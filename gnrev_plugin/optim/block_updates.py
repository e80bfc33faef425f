"""The outcome of a right-inverse step (:mod:`.right_inverse`): each block's update, its report,
the a-posteriori accuracy check with float64 refinement, and the independent ``J Δθ`` check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..nn.coupling import BlockActivations
from ..nn.revmlp import RevMLP
from .block_systems import BlockSystems
from .solvers import HalfLayerSolution, HalfLayerSystem

__all__ = ["BlockUpdate", "BlockReport", "RightInverseResult", "check_accuracy", "param_jvp",
           "solve_kind"]


@dataclass


class BlockUpdate:
    r""":math:`(\Delta W_f, \Delta b_f, \Delta W_g, \Delta b_g)` of one block, laid out like its
    ``nn.Linear`` s.

    Attributes:
        f: Solution of the first half-layer system (:math:`\Delta W_f`, :math:`\Delta b_f`).
        g: Solution of the second half-layer system (:math:`\Delta W_g`, :math:`\Delta b_g`).
        m: The missing-Jacobian term :math:`m = J_g[A_f \Delta_f]`, or ``None``.
    """

    f: HalfLayerSolution
    g: HalfLayerSolution
    #: the missing-Jacobian term ``m = J_g[A_f Δ_f]`` included in ``g.achieved``
    m: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The update as parameter-shaped tensors.

        Returns:
            ``[ΔW_f, Δb_f, ΔW_g, Δb_g]``.
        """
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

    Attributes:
        block: Block index :math:`l`.
        n: Number of samples.
        rank_f: Rank of the first half-layer system.
        rank_g: Rank of the second half-layer system.
        full_rank: Both systems have full row rank.
        role: ``"exact share"`` or ``"least squares"``.
        kind_f: How the first system was solved.
        kind_g: How the second system was solved.
        residual_f: Relative residual of the first solve.
        residual_g: Relative residual of the second solve.
        accurate: Every exact-share system met ``residual_rtol``.
        refined: Iterative refinement was used.
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
    r"""The result of :func:`~gnrev_plugin.optim.right_inverse.right_inverse`.

    Attributes:
        updates: Block index :math:`\to` :class:`BlockUpdate`.
        exact: Whether :math:`J \Delta\theta = \text{target}` holds (to ``residual_rtol``).
        blocks: One :class:`BlockReport` per non-frozen block.
        relative_residual: :math:`\lVert J\Delta\theta - t \rVert / \lVert t \rVert` for the
            target :math:`t`, if verified.
        residual_rtol: The accuracy the solves had to meet.
    """
    updates: dict[int, BlockUpdate]
    exact: bool
    blocks: list[BlockReport] = field(default_factory=list)
    relative_residual: float | None = None
    residual_rtol: float | None = None

    def report(self) -> dict:
        """The result as a plain dict (without the update tensors).

        Returns:
            ``{"exact", "relative_residual", "residual_rtol", "blocks": [...]}``.
        """
        return {"exact": self.exact, "blocks": [asdict(b) for b in self.blocks],
                "relative_residual": self.relative_residual,
                "residual_rtol": self.residual_rtol}


def param_jvp(model: RevMLP, acts: list[BlockActivations],
              updates: dict[int, BlockUpdate]) -> torch.Tensor:
    r"""Independent check: ``J Δθ`` in output space recomputed from ``ΔW, Δb`` themselves, with the
    blocks' own generic JVPs (no solver bookkeeping, no structured shortcut).

    .. math::

        J Δθ = \Big(\sum_ℓ T_ℓ\, [S_f ΔW_f^T + Δb_f,\; J_g[\cdot] + S_g ΔW_g^T + Δb_g]\Big) U.

    Args:
        model: the RevMLP at the step's parameters.
        acts: its per-block activations (with ``s``/``h`` features).
        updates: the block updates.

    Returns:
        ``J Δθ``, shaped like the model output.
    """
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


def solve_kind(system: HalfLayerSystem) -> str:
    """How a half-layer system was solved, for :class:`BlockReport`.

    Args:
        system: a resolved half-layer system.

    Returns:
        Its kind (``"dual"``, ``"linear primal"``...), with ``" + qrcp"`` after a rank-revealing
        factorisation.
    """
    return system.kind + (" + qrcp" if system.gram_method == "qrcp" else "")


def check_accuracy(systems: dict[int, BlockSystems], updates: dict[int, BlockUpdate],
                   blocks: list[int], full: list[int]
                   ) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
    r"""Read every system's relative residual (one host synchronisation); refine the misses of
    exact shares once in float64.

    Returns the exact-share blocks that still miss ``residual_rtol`` (with their residuals) and
    the residuals of all ``blocks`` after refinement.

    .. math::

        \frac{\lVert E - A Δ\rVert}{\lVert E\rVert} \le \mathrm{residual\_rtol}.

    Args:
        systems: every participating block's systems.
        updates: their updates (refined in place).
        blocks: the participating blocks.
        full: the blocks taking an exact share.

    Returns:
        ``(failing, residuals)`` as described above.
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
