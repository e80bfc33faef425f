"""Structured per-layer Grams ``J_ℓ J_ℓᵀ`` for DenseGN, one module per layer kind.

* :mod:`.factored`: the shared factored form and its two evaluation strategies;
* :mod:`.linear`: ``nn.Linear``; :mod:`.conv2d`: ``nn.Conv2d``; :mod:`.norm`: the affine
  parameters of LayerNorm / GroupNorm / BatchNorm in eval mode.

:func:`layer_kind` says which (if any) handles a module; :func:`layer_factors` builds its
:class:`~.factored.LayerFactors` from the layer's input and output-VJPs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import conv2d, linear, norm
from .factored import (
    LayerFactors,
    choose_strategy,
    factored_diagonal,
    factored_gram,
    factored_sample_blocks,
)

__all__ = ["LayerFactors", "choose_strategy", "factored_gram", "factored_diagonal",
           "factored_sample_blocks",
           "layer_kind", "layer_factors", "PARAMETER_NAMES"]

_KINDS: dict[str, tuple[Callable[[nn.Module], bool], Callable[..., LayerFactors]]] = {
    linear.KIND: (linear.supports, linear.linear_factors),
    conv2d.KIND: (conv2d.supports, conv2d.conv2d_factors),
    norm.KIND: (norm.supports, norm.norm_factors),
}
#: The parameter attributes a structured layer kind covers.
PARAMETER_NAMES = ("weight", "bias")


def layer_kind(module: nn.Module) -> str | None:
    """The name of the layer kind that handles ``module`` (``"linear"``, ``"conv2d"``,
    ``"norm"``), or ``None``.

    Args:
        module: any module.

    Returns:
        The kind, or ``None`` when the module needs the generic Jacobian.
    """
    return next((k for k, (ok, _) in _KINDS.items() if ok(module)), None)


def layer_factors(kind: str, module: nn.Module, x: torch.Tensor, G: torch.Tensor,
                  use_weight: bool, use_bias: bool) -> LayerFactors:
    """The factored Jacobian rows of ``module`` (of kind ``kind``).

    Args:
        kind: from :func:`layer_kind`.
        module: the layer.
        x: its input.
        G: output-VJPs ``(n, C, *z.shape[1:])``.
        use_weight, use_bias: which of its parameters are trained.

    Returns:
        :class:`~.factored.LayerFactors`.
    """
    return _KINDS[kind][1](module, x, G, use_weight, use_bias)
