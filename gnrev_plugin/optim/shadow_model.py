"""A float64 (``factor_dtype``) shadow of a RevMLP with bfloat16/float16 parameters, for ExactGN."""

from __future__ import annotations

import torch

from ..compat.torch import tensor_version
from ..nn.revmlp import RevMLP
from .common import is_low_precision

__all__ = ["LowPrecisionShadow", "copy_revmlp"]


def copy_revmlp(model: RevMLP, dtype: torch.dtype | None = None) -> RevMLP:
    """A new RevMLP with ``model``'s configuration, parameter values, buffers and
    ``requires_grad`` flags, but none of its hooks (BackPACK's, an optimizer's output capture).

    Args:
        model: the RevMLP to copy.
        dtype: the copy's dtype (default: ``model``'s); values are converted by ``copy_``.

    Returns:
        The copy, on ``model``'s device.
    """
    p = next(model.parameters())
    copy = RevMLP(**model.config, dtype=p.dtype if dtype is None else dtype).to(p.device)
    copy.load_state_dict(model.state_dict())
    for q, q0 in zip(copy.parameters(), model.parameters(), strict=True):
        q.requires_grad_(q0.requires_grad)
    return copy


class LowPrecisionShadow:
    """Keeps one shadow RevMLP in ``factor_dtype`` holding a low-precision model's values.

    The parameters are copied on every step (exactly: every bfloat16/float16 value is
    representable in float32/float64); the buffers (fixed projections ``C``, readout ``U``) only
    when their versions change.
    """

    def __init__(self) -> None:
        self.model: RevMLP | None = None
        self._key: tuple | None = None

    def working_model(self, model: RevMLP, dtype: torch.dtype) -> RevMLP:
        """The model the step computes with.

        Args:
            model: the trained RevMLP.
            dtype: ``factor_dtype``.

        Returns:
            ``model`` itself, or for bfloat16/float16 parameters the shadow in ``dtype`` holding
            the same values.
        """
        weight = model.blocks[0].f.weight
        if not is_low_precision(weight.dtype):
            return model
        shadow = self.model
        if shadow is None or shadow.blocks[0].f.weight.dtype != dtype \
                or shadow.blocks[0].f.weight.device != weight.device:
            shadow = copy_revmlp(model, dtype)
            self.model, self._key = shadow, None
        for dst, src in zip(shadow.parameters(), model.parameters(), strict=True):
            dst.detach().copy_(src)
        key = tuple((b.data_ptr(), tensor_version(b)) for b in model.buffers())
        if key != self._key:               # the fixed projections / readout
            for dst, src in zip(shadow.buffers(), model.buffers(), strict=True):
                dst.copy_(src)
            self._key = key
        return shadow

    def current(self, model: RevMLP, x: torch.Tensor) -> RevMLP:
        """The model a step's inputs ``x`` were computed with (the shadow when ``x`` is in its
        dtype and not in ``model``'s).

        Args:
            model: the trained RevMLP.
            x: the prepared inputs.

        Returns:
            ``model`` or the shadow.
        """
        if self.model is not None and x.dtype == self.model.blocks[0].f.weight.dtype \
                and x.dtype != model.blocks[0].f.weight.dtype:
            return self.model
        return model
