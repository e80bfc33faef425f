"""A plain multilayer perceptron, the non-reversible model of the runners and the NME experiments.

``MLP(in_features=d, num_classes=C, hidden=[h₁, …, h_k], activation=φ)`` computes

    F = W_{k+1} φ(W_k ⋯ φ(W_1 x + b_1) ⋯ + b_k) + b_{k+1}

with PyTorch's default ``nn.Linear`` initialisation. Activations: ``linear`` (identity),
``relu``, ``gelu``, ``tanh``, ``beta_gelu:<β>`` (β-GELU of Dauphin et al.) and
``ablated_gelu`` / ``ablated_tanh`` / ``ablated_beta_gelu:<β>`` (the same values and Jacobians
with ``φ'' = 0``, i.e. the activation part of the NME removed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dauphin_activations import AblatedBetaGELU, AblatedGELU, AblatedTanh, BetaGELU

__all__ = ["MLP", "make_activation"]


def make_activation(name: str) -> nn.Module:
    """The ``nn.Module`` for an activation name (see the module docstring).

    Args:
        name: Activation name.

    Returns:
        A fresh module.

    Raises:
        ValueError: For an unknown name.
    """
    simple = {"linear": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
              "ablated_gelu": AblatedGELU, "ablated_tanh": AblatedTanh}
    if name in simple:
        return simple[name]()
    for prefix, cls in (("beta_gelu:", BetaGELU), ("ablated_beta_gelu:", AblatedBetaGELU)):
        if name.startswith(prefix):
            return cls(float(name.split(":", 1)[1]))
    raise ValueError(f"unknown activation {name!r}; use one of {sorted(simple)} or "
                     "beta_gelu:<beta> / ablated_beta_gelu:<beta>")


class MLP(nn.Sequential):
    """``d → h₁ → … → h_k → C`` with activation ``φ`` after every hidden layer.

    Args:
        in_features, num_classes: ``d`` and ``C`` (the runner passes the dataset's shape).
        hidden: the hidden widths ``[h₁, …, h_k]`` (an int means one hidden layer).
        activation: see :func:`make_activation`.
        bias: whether the linear layers have biases.
        dtype: parameter dtype (default: torch's default dtype). The layers are initialised in
            the default dtype and then cast, so the initial values do not depend on ``dtype``.
    """

    def __init__(self, *, in_features: int, num_classes: int, hidden: int | Sequence[int] = 256,
                 activation: str = "relu", bias: bool = True,
                 dtype: torch.dtype | str | None = None) -> None:
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if in_features < 1 or num_classes < 1 or any(int(h) < 1 for h in widths):
            raise ValueError(f"MLP widths must be ≥ 1, got d={in_features}, C={num_classes}, "
                             f"hidden={widths}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        layers: list[nn.Module] = []
        prev = in_features
        for h in widths:
            layers += [nn.Linear(prev, int(h), bias=bias), make_activation(activation)]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes, bias=bias))
        super().__init__(*layers)
        if dtype is not None:
            self.to(dtype)
        self.config = dict(in_features=in_features, num_classes=num_classes, hidden=widths,
                           activation=activation, bias=bias)
