r"""The coupling block's transposed Jacobians, for :class:`~.leaf.CouplingLeafExtension`.

For a block :math:`Y_1 = X_1 + u_f`, :math:`u_f = \sigma(X_2 C_f) W_f^\top + b_f`,
:math:`Y_2 = X_2 + u_g`, :math:`u_g = \sigma(Y_1 C_g) W_g^\top + b_g`, the quantity :math:`V` that
BackPACK hands to the block's output (the output gradient for first-order extensions, ``[K, N, d]``
square-root factors :math:`S` of the GGN / MC-Fisher / KFAC, the signed factor lists of
``DiagHessian``) is pulled back by the block's exact transposed Jacobians, computed with
``torch.func.vjp`` on the block's own functional forward:

.. math::

    V \mapsto (V_{u_f}, V_{u_g}, V_X) = (J_{u_f}^\top V,\; J_{u_g}^\top V,\; J_X^\top V),
    \qquad V_{u_f} = V_1 + J_g(Y_1)^\top V_2, \quad V_{u_g} = V_2 .
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.functional import linear

from ...nn import AdditiveCoupling


def _block_forward(block: AdditiveCoupling, x: Tensor, du_f, du_g):
    """The block's forward as a function of its input and of (zero) offsets on the inner outputs
    ``u_f``, ``u_g``, so that one VJP gives the transposed Jacobians to all three. Returns the
    output and, as auxiliary data, ``(s_f, u_f, s_g, u_g)``. Module ``__call__`` s are avoided
    (no hooks fire inside BackPACK's backward pass)."""
    x1, x2 = block.split(x)
    f, g = block.f, block.g
    s_f = f.features(x2)[1]
    u_f = linear(s_f, f.linear.weight.detach(), f.linear.bias.detach())
    y1 = x1 + u_f + du_f
    s_g = g.features(y1)[1]
    u_g = linear(s_g, g.linear.weight.detach(), g.linear.bias.detach())
    return torch.cat([y1, x2 + u_g + du_g], dim=-1), (s_f, u_f, s_g, u_g)


def _inner_io(block: AdditiveCoupling, x: Tensor) -> tuple[Tensor, list[tuple[nn.Linear, Tensor,
                                                                               Tensor]]]:
    """Block output and ``(linear, input s, output u)`` of both inner layers (detached)."""
    with torch.no_grad():
        y, (s_f, u_f, s_g, u_g) = _block_forward(block, x, 0.0, 0.0)
    return y, [(block.f.linear, s_f, u_f), (block.g.linear, s_g, u_g)]


class _Pullback:
    """``V ↦ (V_{u_f}, V_{u_g}, V_X)`` at a block input ``x``, for tensors ``[*lead, n, d]``."""

    def __init__(self, block: AdditiveCoupling, x: Tensor) -> None:
        zero = x.new_zeros(*x.shape[:-1], block.half)
        _, self._vjp, _ = vjp(lambda xx, a, b: _block_forward(block, xx, a, b), x, zero,
                              zero.clone(), has_aux=True)

    def __call__(self, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fn = self._vjp
        for _ in range(V.dim() - 2):  # leading dims (K columns of a square-root factor, ...)
            fn = vmap(fn)
        dx, du_f, du_g = fn(V)
        return du_f, du_g, dx


def _map(q, fn):
    """Apply ``fn`` to a backpropagated quantity: a tensor or DiagHessian's signed lists."""
    if isinstance(q, dict):
        return {"matrices": [fn(m) for m in q["matrices"]], "signs": list(q["signs"])}
    return fn(q)
