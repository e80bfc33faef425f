"""Affine parameters of LayerNorm, GroupNorm and BatchNorm (eval mode) in factored form.

These layers compute ``z = x̂ ⊙ γ + β`` with ``x̂`` the normalised input (per sample for
LayerNorm/GroupNorm; with the running statistics for BatchNorm in eval mode, so samples do not
interact). The per-sample gradients are element-wise,

.. math::

    \\frac{\\partial F_{ic}}{\\partial \\gamma_k} = \\sum_p g_{i,c,k,p}\\, \\hat x_{i,k,p}, \\qquad
    \\frac{\\partial F_{ic}}{\\partial \\beta_k} = \\sum_p g_{i,c,k,p},

over the positions ``p`` sharing the affine entry ``k``: :mod:`.factored` with one group per
entry ``k`` (``m = 1``) and patch vectors ``[x̂_{i,k,p}; 1]``. BatchNorm in training mode couples
the samples and is not handled here (DenseGN takes the batch Jacobian instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .factored import LayerFactors
from .linear import patch_vectors

__all__ = ["KIND", "supports", "norm_factors", "normalised_input"]

KIND = "norm"
_BN = nn.modules.batchnorm._BatchNorm


def supports(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, and BatchNorm in eval mode with running statistics."""
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        return True
    return (isinstance(module, _BN) and not module.training and module.running_mean is not None)


def normalised_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x̂``: the layer's output without its affine transform (same shape as ``x``).

    Args:
        module: a layer accepted by :func:`supports`.
        x: its input.

    Returns:
        ``x̂``.
    """
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0,
                        module.eps)


def norm_factors(module: nn.Module, x: torch.Tensor, G: torch.Tensor, use_weight: bool,
                 use_bias: bool) -> LayerFactors:
    """The layer's factored Jacobian rows (module docstring).

    Args:
        module: a layer accepted by :func:`supports`.
        x: its input (``(n, *, *normalized_shape)`` for LayerNorm, ``(n, channels, *)`` else).
        G: ``∂F_{ic}/∂z_i`` for its output ``z``, ``(n, C, *z.shape[1:])``.
        use_weight, use_bias: which of ``γ``, ``β`` are trained.

    Returns:
        :class:`~.factored.LayerFactors` with one group per affine entry.
    """
    n, C = G.shape[:2]
    xhat = normalised_input(module, x)
    if isinstance(module, nn.LayerNorm):
        K = int(torch.Size(module.normalized_shape).numel())
        xk = xhat.reshape(n, -1, K).transpose(1, 2)                  # (n, K, T)
        gk = G.reshape(n, C, -1, K).transpose(2, 3)                  # (n, C, K, T)
    else:
        K = x.shape[1]
        xk = xhat.reshape(n, K, -1)
        gk = G.reshape(n, C, K, -1)
    a = patch_vectors(xk[..., None], use_weight, use_bias)           # (n, K, T, d)
    return LayerFactors(a, gk[:, :, :, None])                        # g: (n, C, K, 1, T)
