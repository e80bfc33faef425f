"""Pointwise activations with their first derivative, as the exact GN step needs them.

The exact Gauss-Newton update of a reversible block (see :mod:`gnrev_plugin.optim.exact_gn`) pulls
output-space tangents back through each coupling. For one half-layer ``f(Z) = σ(Z C) Wᵀ + b`` the
Jacobian-vector product is ``J_f(Z)[V] = (σ'(Z C) ⊙ (V C)) Wᵀ``, so every activation here carries an
explicit derivative ``σ'`` (no autograd inside the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Activation", "get_activation", "ACTIVATIONS"]


@dataclass(frozen=True)
class Activation:
    """A pointwise nonlinearity ``σ`` with its derivative ``σ'``.

    Attributes:
        name: registry name, recorded in configs.
        fn: ``σ(h)``.
        derivative: ``σ'(h)``, evaluated on the pre-activation ``h``.
        is_linear: ``True`` for the identity; a linear half-layer has rank ≤ ``d/2 + 1``.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    is_linear: bool = False

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)

    def mul_derivative_(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""In place :math:`t \leftarrow \sigma'(h) \odot t` (ReLU: a masked fill, identity: nothing).

        Args:
            h: Pre-activation :math:`h` (for ReLU also accepted: :math:`s = \sigma(h)`).
            t: Tensor overwritten with :math:`\sigma'(h) \odot t`.

        Returns:
            ``t``.
        """
        if self.name == "relu":
            return t.masked_fill_(h <= 0, 0.0)
        if self.is_linear:
            return t
        return t.mul_(self.derivative(h))


def _gelu_derivative(h: torch.Tensor) -> torch.Tensor:
    # d/dh [h Φ(h)] = Φ(h) + h φ(h)
    cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return cdf + h * pdf


def _tanh_derivative(h: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(h)
    return 1.0 - t * t


def _sigmoid_derivative(h: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(h)
    return s * (1.0 - s)


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


def _relu_derivative(h: torch.Tensor) -> torch.Tensor:
    return (h > 0).to(h.dtype)


# Named functions (no lambdas), so models stay picklable with torch.save.
ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation("identity", _identity, torch.ones_like, is_linear=True),
    "relu": Activation("relu", torch.relu, _relu_derivative),
    "tanh": Activation("tanh", torch.tanh, _tanh_derivative),
    "gelu": Activation("gelu", torch.nn.functional.gelu, _gelu_derivative),
    "sigmoid": Activation("sigmoid", torch.sigmoid, _sigmoid_derivative),
    "softplus": Activation("softplus", torch.nn.functional.softplus, torch.sigmoid),
}


def get_activation(activation: str | Activation) -> Activation:
    """Return the :class:`Activation` named ``activation`` (or ``activation`` itself).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.

    Args:
        activation: A registry name or an :class:`Activation`.

    Returns:
        The :class:`Activation`.
    """
    if isinstance(activation, Activation):
        return activation
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)} "
            "(or pass an Activation(name, fn, derivative))"
        ) from None
