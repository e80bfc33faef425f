"""Activations for the NME experiments of Dauphin, Agarwala & Mobahi (NeurIPS 2024).

**β-GELU.** ``φ_β(x) = x Φ(βx)`` with ``Φ`` the standard normal CDF and ``ϕ`` its density:

    φ_β'(x)  = Φ(βx) + βx ϕ(βx)
    φ_β''(x) = β (2 − β²x²) ϕ(βx)

``β = 1`` is the exact (erf) GELU; ``β → ∞`` gives ReLU. ``∫ φ_β'' dx = 1`` for every ``β``, so
``φ_β'' → δ`` and the second derivative becomes sparse as ``β`` grows.

**Activation-NME ablation.** The only place ``φ''`` enters the loss Hessian is the within-layer
("activation") part of the NME. :class:`NMEAblatedActivation` keeps the value ``φ(x)`` and the first
derivative ``φ'(x)`` but evaluates ``φ'`` on the *detached* pre-activation ``x₀ = stopgrad(x)``:

    y = φ(x₀) + φ'(x₀) (x − x₀)

so forward values, Jacobians and the Gauss-Newton matrix ``G`` are unchanged while double-backward
sees ``φ'' = 0``.

**Synthetic NME for ReLU.** :class:`SyntheticNMEReLU` keeps ReLU's value and step derivative and adds
a surrogate curvature ``s(x₀)`` (by default ``φ_β''``):
``y = relu(x₀) + 1[x₀ > 0](x − x₀) + ½ s(x₀)(x − x₀)²``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "beta_gelu", "beta_gelu_derivative", "beta_gelu_second_derivative", "BetaGELU",
    "NMEAblatedActivation", "AblatedGELU", "AblatedBetaGELU", "AblatedTanh", "SyntheticNMEReLU",
    "active_second_derivative_fraction",
]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"β-GELU needs a finite β > 0, got {beta}")
    return beta


def beta_gelu(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    r"""``φ_β(x) = x Φ(βx)``.

    Args:
        x: Input.
        beta: :math:`\beta > 0`.

    Returns:
        :math:`\varphi_\beta(x) = x\,\Phi(\beta x)`.
    """
    return x * _cdf(_check_beta(beta) * x)


def beta_gelu_derivative(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    r"""``φ_β'(x) = Φ(βx) + βx ϕ(βx)``.

    Args:
        x: Input.
        beta: :math:`\beta > 0`.

    Returns:
        :math:`\varphi_\beta'(x) = \Phi(\beta x) + \beta x\, \phi(\beta x)`.
    """
    bx = _check_beta(beta) * x
    return _cdf(bx) + bx * _pdf(bx)


def beta_gelu_second_derivative(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    r"""``φ_β''(x) = β (2 − β²x²) ϕ(βx)``.

    Args:
        x: Input.
        beta: :math:`\beta > 0`.

    Returns:
        :math:`\varphi_\beta''(x) = \beta (2 - \beta^2 x^2)\, \phi(\beta x)`.
    """
    beta = _check_beta(beta)
    bx = beta * x
    return beta * (2.0 - bx * bx) * _pdf(bx)


class BetaGELU(nn.Module):
    r"""``φ_β(x) = x Φ(βx)`` as a module (``β = 1`` equals ``nn.GELU()``).

    Args:
        beta: :math:`\beta > 0`.
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = _check_beta(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""Apply the activation.

        Args:
            x: Input.

        Returns:
            :math:`\varphi_\beta(x)`.
        """
        return beta_gelu(x, self.beta)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        r"""The first derivative.

        Args:
            x: Input.

        Returns:
            :math:`\varphi_\beta'(x)`.
        """
        return beta_gelu_derivative(x, self.beta)

    def extra_repr(self) -> str:
        """Module repr.

        Returns:
            ``"beta=..."``.
        """
        return f"beta={self.beta}"


class NMEAblatedActivation(nn.Module):
    """``y = φ(x₀) + φ'(x₀)(x − x₀)`` with ``x₀ = stopgrad(x)``: keeps ``φ`` and ``φ'``, drops ``φ''``.

    Args:
        fn: ``φ``.
        derivative: ``φ'`` (evaluated on the detached input only).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor],
                 derivative: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn, self.derivative = fn, derivative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""Value and first derivative of :math:`\varphi`, no second derivative.

        Args:
            x: Input :math:`x`.

        Returns:
            :math:`\varphi(x_0) + \varphi'(x_0)(x - x_0)` with :math:`x_0 = \operatorname{stopgrad}(x)`.
        """
        x0 = x.detach()
        return self.fn(x0) + self.derivative(x0) * (x - x0)


class AblatedGELU(NMEAblatedActivation):
    """Exact GELU with its second derivative removed from double-backward."""

    def __init__(self) -> None:
        super().__init__(torch.nn.functional.gelu, lambda x: beta_gelu_derivative(x, 1.0))


class AblatedBetaGELU(NMEAblatedActivation):
    r"""β-GELU with its second derivative removed from double-backward.

    Args:
        beta: :math:`\beta > 0`.
    """

    def __init__(self, beta: float = 1.0) -> None:
        beta = _check_beta(beta)
        super().__init__(lambda x: beta_gelu(x, beta), lambda x: beta_gelu_derivative(x, beta))
        self.beta = beta


class AblatedTanh(NMEAblatedActivation):
    """``tanh`` with its second derivative removed from double-backward."""

    def __init__(self) -> None:
        super().__init__(torch.tanh, lambda x: 1.0 - torch.tanh(x) ** 2)


class SyntheticNMEReLU(nn.Module):
    r"""ReLU value and step derivative plus a surrogate curvature ``s(x₀)`` (default ``φ_β''``).

    ``y = relu(x₀) + 1[x₀ > 0](x − x₀) + ½ s(x₀)(x − x₀)²``; at ``x = x₀`` the value and first
    derivative are ReLU's and the second derivative is ``s(x₀)``.

    Args:
        beta: :math:`\beta` of the default curvature :math:`\varphi_\beta''`.
        curvature: :math:`s`, a function of :math:`x_0`; default :math:`\varphi_\beta''`.
    """

    def __init__(self, beta: float = 4.0,
                 curvature: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.beta = _check_beta(beta)
        self.curvature = curvature or (lambda x: beta_gelu_second_derivative(x, self.beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the surrogate.

        Args:
            x: Input :math:`x`.

        Returns:
            :math:`y` (see the class docstring).
        """
        x0 = x.detach()
        dx = x - x0
        return torch.relu(x0) + (x0 > 0).to(x.dtype) * dx + 0.5 * self.curvature(x0) * dx * dx


def active_second_derivative_fraction(h: torch.Tensor, beta: float, tol: float = 1e-3) -> float:
    r"""Fraction of entries with ``|φ_β''(h)| > tol`` (the sparsity of the activation NME).

    Args:
        h: Pre-activations.
        beta: :math:`\beta`.
        tol: Threshold on :math:`\lvert \varphi_\beta''(h) \rvert`.

    Returns:
        The fraction in :math:`[0, 1]`.
    """
    return (beta_gelu_second_derivative(h, beta).abs() > tol).double().mean().item()
