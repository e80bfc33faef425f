"""The input validation of every optimizer step (DenseGN, the sharpness wrappers): the dtype,
shape and finiteness of a batch, its targets against the model's output width, all checked before
any work, so that the parameters are left unchanged. The checks themselves are
:mod:`gnrev_plugin.nn.validation` (shared with the metrics); this module adds what is particular
to a step: the parameters' dtype, the capture hooks suspended during the width probe, and
:class:`~gnrev_plugin.optim.errors.NonFiniteError` for non-finite values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn.validation import check_targets, check_tensor, loss_kind_of, output_width
from .capture import suspended
from .errors import NonFiniteError

__all__ = ["validate_batch", "check_tensor", "check_targets", "loss_kind_of"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def validate_batch(who: str, model: nn.Module, x: Any, y: Any, loss: str | None) -> None:
    """Every check of one optimizer step (or metric) on ``(x, y)`` before any work.

    Args:
        who: the optimizer or metric (``type(self).__name__``), for the messages.
        model: the model (its parameters' dtype; its output width :math:`C`, from a forward of
            one sample that changes nothing).
        x: the inputs, ``(n, ...)``.
        y: the targets (see :func:`check_targets`).
        loss: ``"cross_entropy"``, ``"mse"`` or ``None``.

    Raises:
        TypeError: a non-tensor.
        ValueError: a wrong dtype, shape, output width, label range, or an empty batch.
        NonFiniteError: non-finite inputs or floating targets (the parameters were not changed).
    """
    check_tensor(who, "inputs", x, floating=True, finite=False)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype not in _LOW_PRECISION and x.dtype != param.dtype:
        raise ValueError(f"{who}: inputs are {x.dtype} but the model's parameters are "
                         f"{param.dtype}; convert one of them (x.to({param.dtype}) or "
                         f"model.to({x.dtype}))")
    probe = x.to(param.dtype) if param is not None and param.dtype in _LOW_PRECISION else x
    check_tensor(who, "targets", y, finite=False)
    check_targets(who, loss, y, x.shape[0], _width(who, model, probe), finite=False)
    for name, t in (("inputs", x), ("targets", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{who}: non-finite {name} (NaN or inf); the parameters were not "
                                 "changed")


def _width(who: str, model: nn.Module, x: torch.Tensor) -> int:
    with suspended():          # the probe forward is not a batch for the loss capture
        return output_width(who, model, x)
