"""``nn.Conv2d`` in factored form: patch vectors are the unfolded input patches.

With ``unfold`` (:func:`torch.nn.functional.unfold`, the layer's kernel size, dilation, padding
and stride) sample ``i``'s input gives, at output position ``p``, the patch
``a_{i,p} ∈ R^{(in/G)·kh·kw}`` per group ``g`` (channel-major, the weight's layout), and the
output-VJP ``g_{i,c,p} ∈ R^{out/G}``. Then

.. math::

    \\frac{\\partial F_{ic}}{\\partial W_g} = \\sum_p g_{i,c,g,p}\\, a_{i,g,p}^\\top, \\qquad
    \\frac{\\partial F_{ic}}{\\partial b_g} = \\sum_p g_{i,c,g,p},

i.e. :mod:`.factored` with ``G`` groups, ``T = H'W'`` positions and ``d = (in/G)·kh·kw (+1)``.
Non-zero padding modes (``reflect``, ``replicate``, ``circular``) and ``padding="same"`` are
applied with :func:`torch.nn.functional.pad` before unfolding, as ``nn.Conv2d`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .factored import LayerFactors
from .linear import patch_vectors

__all__ = ["KIND", "supports", "conv2d_factors", "unfold_patches"]

KIND = "conv2d"


def supports(module: nn.Module) -> bool:
    """Whether :func:`conv2d_factors` handles ``module``."""
    return isinstance(module, nn.Conv2d)


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` for ``F.pad`` when the layer pads other than by ``unfold``'s
    symmetric zero padding, else ``None``."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0) if module.padding_mode != "zeros" else None
        pads = []
        for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if module.padding_mode == "zeros":
        return None
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def unfold_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches the layer multiplies its weight with: ``(n, G, T, (in/G)·kh·kw)``.

    Args:
        module: the layer.
        x: its input, ``(n, in, H, W)``.

    Returns:
        Patches per group and output position (row-major over ``H' × W'``).
    """
    if x.dim() != 4:
        raise ValueError(f"conv2d Gram expects (n, C, H, W) inputs, got {tuple(x.shape)}")
    pads = _explicit_padding(module)
    padding = module.padding
    if pads is not None:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride)                                   # (n, in·k², T)
    n, _, T = cols.shape
    G = module.groups
    return cols.reshape(n, G, -1, T).transpose(-1, -2)


def conv2d_factors(module: nn.Conv2d, x: torch.Tensor, G: torch.Tensor, use_weight: bool,
                   use_bias: bool) -> LayerFactors:
    """The layer's factored Jacobian rows (module docstring).

    Args:
        module: the layer.
        x: its input, ``(n, in, H, W)``.
        G: ``∂F_{ic}/∂z_i`` for its output ``z``, ``(n, C, out, H', W')``.
        use_weight, use_bias: which of its parameters are trained.

    Returns:
        :class:`~.factored.LayerFactors` with ``module.groups`` groups.
    """
    n, C = G.shape[:2]
    groups = module.groups
    patches = unfold_patches(module, x) if use_weight else x.new_zeros(n, groups, 1, 0)
    if not use_weight:
        patches = patches.expand(n, groups, G.shape[-1] * G.shape[-2], 0)
    a = patch_vectors(patches, use_weight, use_bias)
    g = G.reshape(n, C, groups, module.out_channels // groups, -1)
    if g.shape[-1] != a.shape[2]:
        raise ValueError(f"conv2d Gram: {a.shape[2]} unfolded positions but an output of "
                         f"{g.shape[-1]} positions (unsupported padding?)")
    return LayerFactors(a, g)
