"""Checks of what goes into a model and its loss, shared by every optimizer step
(:mod:`gnrev_plugin.optim.validation`) and every metric (:mod:`gnrev_plugin.metrics`): the one
input-validation layer, with ExactGN's quality of message (it names the problem; nothing is
computed before it passes).

Checked: the type and shape of a tensor, an empty batch, one target per input, the targets' form
for the loss (class indices of shape ``(n,)`` in ``[0, C)`` for cross-entropy, floating ``(n, C)``
for MSE, with ``C`` the model's output width), and non-finite values. ``TypeError`` for a
non-tensor, ``ValueError`` for everything else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["check_tensor", "check_targets", "output_width", "loss_kind_of"]


def check_tensor(who: str, name: str, t: Any, *, min_dim: int = 1, n: int | None = None,
                 floating: bool = False, finite: bool = True) -> torch.Tensor:
    """``t``, or a named ``TypeError``/``ValueError`` saying what is wrong with it.

    Args:
        who: the optimizer or metric, for the message.
        name: what ``t`` is (``"inputs"``, ``"targets"``, ``"X"``...).
        t: the value to check.
        min_dim: the least number of dimensions (the first is the sample axis).
        n: the number of samples ``t`` must have (``None``: at least one).
        floating: ``t`` must be real floating point.
        finite: every entry must be finite (floating tensors only).

    Returns:
        ``t`` unchanged.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(f"{who}: {name} must have at least {min_dim} dimension(s) (samples "
                         f"first), got shape {tuple(t.shape)}")
    if n is None and t.shape[0] == 0:
        raise ValueError(f"{who}: empty batch: the {name} (shape {tuple(t.shape)}) hold no "
                         "sample; at least one is needed")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{who}: {n} inputs but {name} of shape {tuple(t.shape)}; need one "
                         "target per input")
    if floating and (not t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{who}: {name} must be real floating point, got {t.dtype}")
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{who}: the {name} hold {bad} non-finite value(s) (NaN or inf); the "
                         "result would be undefined")
    return t


def check_targets(who: str, loss: str | None, y: Any, n: int, c: int | None, *,
                  finite: bool = True) -> None:
    """The targets' form for ``loss`` (``"cross_entropy"``, ``"mse"``, or ``None``: only one per
    input and finite), with ``c`` the model's output width (``None``: unknown).

    Args:
        who: the optimizer or metric, for the message.
        loss: the loss name.
        y: the targets.
        n: the number of inputs.
        c: the number of outputs :math:`C`; class indices must lie in :math:`[0, C)`.
        finite: floating targets must be finite.
    """
    check_tensor(who, "targets", y, n=n, finite=finite)
    if loss == "mse":
        if not y.is_floating_point() or (c is not None and tuple(y.shape) != (n, c)):
            raise ValueError(f"{who}: MSE targets must be floating point of the output's shape "
                             f"({n}, {c if c is not None else 'C'}), got {tuple(y.shape)} "
                             f"{y.dtype}")
    elif loss == "cross_entropy":
        if y.is_floating_point() and (y.dim() == 2 and c in (None, y.shape[1])):
            return                                   # probabilities
        if y.is_floating_point() or y.dim() != 1 or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"{who}: cross-entropy targets must be integer class indices of "
                             f"shape ({n},) or probabilities of shape ({n}, {c or 'C'}); got "
                             f"{tuple(y.shape)} {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (c is not None and hi >= c):
            raise ValueError(f"{who}: class indices must lie in [0, {c}) for a model with {c} "
                             f"outputs, got range [{lo}, {hi}]")


def output_width(who: str, model: nn.Module, x: torch.Tensor) -> int:
    """``C``: the model's output width on the first sample of ``x``, with nothing changed.

    The forward runs in eval mode, without grad, with torch's RNG forked (dropout draws are
    undone).

    Args:
        who: the caller, for the message.
        model: the model.
        x: the inputs ``(n, ...)``, ``n ≥ 1``.

    Returns:
        :math:`C`, the width of the model's ``(1, C)`` output.

    Raises:
        ValueError: the model rejects the inputs, or its output is not ``(n, C)``.
    """
    modes = [(m, m.training) for m in model.modules()]   # per module: a mixed model stays mixed
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            out = model(x[:1])
    except RuntimeError as err:
        raise ValueError(f"{who}: the model rejects inputs of shape {tuple(x.shape)} "
                         f"{x.dtype}: {err}") from None
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"{who}: the model must return outputs of shape (n, C), got "
                         f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}")
    return int(out.shape[1])


def loss_kind_of(loss_fn: Any) -> str | None:
    """``"cross_entropy"``/``"mse"`` for ``nn.CrossEntropyLoss``/``nn.MSELoss``, else ``None``."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return "cross_entropy"
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    return None
