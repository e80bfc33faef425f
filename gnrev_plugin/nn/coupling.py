"""One additive coupling block of the RevMLP (Buffelli et al., NeurIPS 2024, eqs. 14-15).

With the input split in halves ``X = [X1, X2]`` (``X1, X2 ∈ R^{n×d/2}``) one block computes

    Y1 = X1 + f(X2),   f(Z) = σ(Z C_f) W_fᵀ + b_f
    Y2 = X2 + g(Y1),   g(Z) = σ(Z C_g) W_gᵀ + b_g

and its exact inverse is ``X2 = Y2 − g(Y1)``, ``X1 = Y1 − f(X2)``. ``C_f, C_g ∈ R^{d/2×M}`` are fixed
random "inverted bottleneck" projections with entries ``N(0, 1/M)`` (buffers); only ``W`` (``d/2×M``,
stored as ``nn.Linear(M, d/2).weight``) and ``b`` are trained.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..compat.backpack import opt_out_of_extend
from .activations import Activation, get_activation

__all__ = ["CouplingFunction", "AdditiveCoupling", "BlockActivations"]


class BlockActivations(NamedTuple):
    """What one block's forward pass leaves for the exact GN step (all detached).

    ``h_f = X2 C_f`` and ``s_f = σ(h_f)`` for the first half-layer, ``h_g = Y1 C_g`` and
    ``s_g = σ(h_g)`` for the second. The per-half-layer design matrices of the GN systems are
    ``A_f = [s_f, 1]`` and ``A_g = [s_g, 1]``. For ReLU, ``h`` is ``s`` itself (same tensor):
    only the sign pattern ``1[h > 0] = 1[s > 0]`` of the pre-activation is ever needed.
    """

    #: :math:`h_f = X_2 C_f` (for ReLU: :math:`s_f`).
    h_f: torch.Tensor
    #: :math:`s_f = \sigma(h_f)`.
    s_f: torch.Tensor
    #: :math:`h_g = Y_1 C_g` (for ReLU: :math:`s_g`).
    h_g: torch.Tensor
    #: :math:`s_g = \sigma(h_g)`.
    s_g: torch.Tensor


class CouplingFunction(nn.Module):
    r"""The half-layer map :math:`Z \mapsto \sigma(Z C) W^\top + b` with a fixed random projection :math:`C`.

    Args:
        in_features: width of ``Z`` (``d/2``).
        hidden: bottleneck width ``M`` (the paper uses ``M ≫ d/2``, an *inverted* bottleneck).
        out_features: width of the output (``d/2``).
        activation: name or :class:`~gnrev_plugin.nn.activations.Activation` ``σ``.
        init_std: standard deviation of ``W``'s normal initialisation (paper: ``1e-3``); ``b = 0``.
        proj_gain: ``C`` has entries ``N(0, proj_gain²/M)``.
        generator: optional RNG for reproducible construction.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        activation: str | Activation = "relu",
        init_std: float = 1e-3,
        proj_gain: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.activation = get_activation(activation)
        proj = torch.randn(in_features, hidden, generator=generator, dtype=torch.float64)
        self.register_buffer("projection", (proj * (proj_gain / hidden**0.5)).to(dtype))
        self.linear = nn.Linear(hidden, out_features, dtype=dtype)
        with torch.no_grad():
            w = torch.randn(out_features, hidden, generator=generator, dtype=torch.float64)
            self.linear.weight.copy_(w * init_std)
            self.linear.bias.zero_()

    @property
    def weight(self) -> nn.Parameter:
        """``W`` (``out_features × M``).

        Returns:
            :math:`W`.
        """
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter:
        """``b`` (``out_features``).

        Returns:
            :math:`b`.
        """
        return self.linear.bias

    def features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Return the pre-activation :math:`h = Z C` and the features :math:`s = \sigma(h)`.

        For ReLU the activation is applied in place and ``h`` is returned as ``s`` itself:
        ``σ'(h) = 1[h > 0] = 1[s > 0]``, so nothing downstream needs the pre-activation, and the
        step saves one ``n×M`` buffer per half-layer.

        Args:
            z: Input :math:`Z`, ``(n, d/2)``.

        Returns:
            ``(h, s)`` with :math:`h = Z C`, :math:`s = \sigma(h)`, each ``(n, M)``.
        """
        h = z @ self.projection
        if self.activation.name == "relu":
            s = h.relu_()
            return s, s
        return h, self.activation(h)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        r"""The half-layer map :math:`Z \mapsto \sigma(Z C) W^\top + b`.

        Args:
            z: Input :math:`Z`, ``(n, d/2)``.

        Returns:
            ``(n, out_features)``.
        """
        return self.linear(self.features(z)[1])

    def jvp_input(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Input Jacobian-vector product :math:`J_f(Z)[V] = (\sigma'(Z C) \odot (V C)) W^\top` at
        :math:`h = Z C`.

        Args:
            h: Pre-activation :math:`h = Z C` (for ReLU: :math:`s`).
            v: Tangent :math:`V`, ``(n, d/2)``.

        Returns:
            :math:`J_f(Z)[V]`, ``(n, out_features)``.
        """
        t = self.activation.mul_derivative_(h, v @ self.projection)
        return t @ self.linear.weight.T


class AdditiveCoupling(nn.Module):
    """A reversible block ``[X1, X2] ↦ [X1 + f(X2), X2 + g(X1 + f(X2))]``.

    Args:
        features: ``d`` (even); the halves are the first and second ``d/2`` features.
        hidden: ``M``, the width of both half-layers' random projections.
        activation: ``σ`` of both half-layers (``"identity"`` gives a linear block).
        init_std, proj_gain, generator, dtype: as in :class:`CouplingFunction`.
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        activation: str | Activation = "relu",
        init_std: float = 1e-3,
        proj_gain: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if features % 2 or features < 2:
            raise ValueError(f"a coupling block needs an even number of features, got {features}")
        self.features = features
        self.half = features // 2
        kw = dict(activation=activation, init_std=init_std, proj_gain=proj_gain,
                  generator=generator, dtype=dtype)
        self.f = CouplingFunction(self.half, hidden, self.half, **kw)
        self.g = CouplingFunction(self.half, hidden, self.half, **kw)
        # For BackPACK the block is one leaf (its module extensions live in
        # gnrev_plugin.hosts.backpack), so its parts opt out of `backpack.extend`'s hooks.
        for part in (self.f, self.g, self.f.linear, self.g.linear):
            opt_out_of_extend(part)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split features into halves :math:`X = [X_1, X_2]`.

        Args:
            x: ``(n, d)``.

        Returns:
            ``(X1, X2)``, each ``(n, d/2)``.
        """
        return x[..., : self.half], x[..., self.half :]

    def forward_with_activations(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, BlockActivations]:
        """Forward pass that also returns the :class:`BlockActivations` (detached).

        Args:
            x: Block input :math:`X`, ``(n, d)``.

        Returns:
            ``(Y, acts)`` with :math:`Y = [Y_1, Y_2]`.
        """
        x1, x2 = self.split(x)
        h_f, s_f = self.f.features(x2)
        y1 = x1 + self.f.linear(s_f)
        h_g, s_g = self.g.features(y1)
        y2 = x2 + self.g.linear(s_g)
        acts = BlockActivations(h_f.detach(), s_f.detach(), h_g.detach(), s_g.detach())
        return torch.cat([y1, y2], dim=-1), acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block :math:`Y_1 = X_1 + f(X_2)`, :math:`Y_2 = X_2 + g(Y_1)`.

        Args:
            x: Block input :math:`X`, ``(n, d)``.

        Returns:
            :math:`Y = [Y_1, Y_2]`, ``(n, d)``.
        """
        x1, x2 = self.split(x)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        r"""Exact inverse: :math:`X_2 = Y_2 - g(Y_1)`, :math:`X_1 = Y_1 - f(X_2)`.

        Args:
            y: Block output :math:`Y`, ``(n, d)``.

        Returns:
            :math:`X` with ``forward(X) == y`` up to rounding.
        """
        y1, y2 = self.split(y)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=-1)

    def jvp_input(self, acts: BlockActivations, v: torch.Tensor) -> torch.Tensor:
        r"""Push an input tangent forward: ``δY1 = δX1 + J_f[δX2]``, ``δY2 = δX2 + J_g[δY1]``.

        Args:
            acts: The block's :class:`BlockActivations` at :math:`X`.
            v: Input tangent :math:`\delta X`, ``(n, d)``.

        Returns:
            Output tangent :math:`\delta Y = J_X \delta X`.
        """
        v1, v2 = self.split(v)
        d1 = v1 + self.f.jvp_input(acts.h_f, v2)
        d2 = v2 + self.g.jvp_input(acts.h_g, d1)
        return torch.cat([d1, d2], dim=-1)

    def inverse_jvp_input(self, acts: BlockActivations, t: torch.Tensor) -> torch.Tensor:
        r"""Pull an output tangent back through the inverse Jacobian of the block.

        ``δX2 = T2 − J_g(Y1)[T1]``, ``δX1 = T1 − J_f(X2)[δX2]``; then ``jvp_input(δX) = T``.

        Args:
            acts: The block's :class:`BlockActivations` at :math:`X`.
            t: Output tangent :math:`T`, ``(n, d)``.

        Returns:
            :math:`\delta X = J_X^{-1} T`.
        """
        t1, t2 = self.split(t)
        d2 = t2 - self.g.jvp_input(acts.h_g, t1)
        d1 = t1 - self.f.jvp_input(acts.h_f, d2)
        return torch.cat([d1, d2], dim=-1)
