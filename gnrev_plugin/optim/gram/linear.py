"""``nn.Linear`` in factored form: patch vectors are the layer inputs.

For an input ``x_i ∈ R^{T×d}`` (``T = 1`` for 2-D inputs, else the product of the leading
dimensions, e.g. a sequence) and output-VJPs ``g_{i,c} ∈ R^{T×m}``, the weight's per-sample
gradient is ``Σ_p g_{i,c,p} x_{i,p}ᵀ`` and the bias's ``Σ_p g_{i,c,p}``: one group, patch vectors
``a_{i,p} = [x_{i,p}; 1]`` (the ``1`` only when the bias is trained). With ``T = 1`` the
patch-Gram strategy is the classic ``(AAᵀ + 1) ⊙ GGᵀ``.
"""

from __future__ import annotations

import torch
from torch import nn

from .factored import LayerFactors

__all__ = ["KIND", "supports", "linear_factors"]

KIND = "linear"


def supports(module: nn.Module) -> bool:
    """Whether :func:`linear_factors` handles ``module``."""
    return isinstance(module, nn.Linear)


def patch_vectors(x: torch.Tensor, use_weight: bool, use_bias: bool) -> torch.Tensor:
    """``(n, T, d')``: ``x`` (``(n, T, d)``) with a ones column appended for a trained bias (only
    the ones for a bias alone)."""
    cols = [x] if use_weight else []
    if use_bias:
        cols.append(x.new_ones(*x.shape[:-1], 1))
    return torch.cat(cols, dim=-1) if len(cols) > 1 else cols[0]


def linear_factors(module: nn.Linear, x: torch.Tensor, G: torch.Tensor, use_weight: bool,
                   use_bias: bool) -> LayerFactors:
    """The layer's factored Jacobian rows.

    .. math::

        \\frac{\\partial F_{ic}}{\\partial W} = \\sum_p g_{i,c,p}\\, x_{i,p}^\\top, \\qquad
        \\frac{\\partial F_{ic}}{\\partial b} = \\sum_p g_{i,c,p}

    Args:
        module: the layer.
        x: its input, ``(n, *, in_features)``.
        G: ``∂F_{ic}/∂z_i`` for its output ``z``, ``(n, C, *, out_features)``.
        use_weight, use_bias: which of its parameters are trained.

    Returns:
        :class:`~.factored.LayerFactors` with one group.
    """
    n, C = G.shape[:2]
    xs = x.reshape(n, -1, module.in_features)
    a = patch_vectors(xs, use_weight, use_bias)[:, None]                # (n, 1, T, d)
    g = G.reshape(n, C, -1, module.out_features).transpose(-1, -2)      # (n, C, m, T)
    return LayerFactors(a, g[:, :, None])
