"""Gather a RevMLP's per-block features on the root rank for the distributed ExactGN step."""

from __future__ import annotations

import torch

from ..nn.coupling import BlockActivations
from ..nn.revmlp import RevMLP
from . import distributed as gdist
from .block_systems import LinearBlockActivations, is_linear_block, linear_block_forward

__all__ = ["gather_block_rows"]


def gather_block_rows(comm: gdist.Comm, model: RevMLP, acts, eps: torch.Tensor, x: torch.Tensor):
    """Gather the rows every half-layer system needs on the root.

    Per block ``(h_f, s_f, h_g, s_g)`` (ReLU: ``h`` is ``s``, sent once) or, for a linear block,
    ``(X2, Y1)``; then ``ε`` and the flattened inputs.

    Args:
        comm: the process group's communicator.
        model: the RevMLP the activations were recorded on.
        acts: its per-block activations on the local batch.
        eps: the local Newton target ``ε``.
        x: the flattened local inputs.

    Returns:
        ``(acts, eps, inputs)`` of the global batch on the root, ``(None, None, None)`` elsewhere.
    """
    acts = list(acts)
    if is_linear_block(model.blocks[0]) and not isinstance(acts[0], LinearBlockActivations):
        acts[0] = linear_block_forward(model.blocks[0], x)[1]   # n×d/2 instead of n×M
    fields: list[torch.Tensor] = []
    for a in acts:
        fields += [a.x2, a.y1] if isinstance(a, LinearBlockActivations) else list(a)
    got = comm.gather_rows([*fields, eps, x])
    if got is None:
        return None, None, None
    out, i = [], 0
    for a in acts:
        if isinstance(a, LinearBlockActivations):
            out.append(LinearBlockActivations(a.block, got[i], got[i + 1], a.P_f, a.P_g))
            i += 2
        else:
            out.append(BlockActivations(*got[i:i + 4]))
            i += 4
    return out, got[i], got[i + 1]
