"""Checks and the parameter update shared by :class:`ExactGN` and :class:`DenseGN`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch

from .errors import NonFiniteError
from .targets import CE_TARGETS, LOSSES

__all__ = ["validate_gn_options", "check_finite", "check_all_finite", "apply_update",
           "is_low_precision", "caller_stacklevel", "as_dtype"]

#: Frames in these folders are this package's optimizers or torch (``torch.no_grad`` and
#: ``Optimizer.step`` wrappers); a warning skips them to point at the caller.
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by the function calling this: the first frame
    outside gnrev's optimizers and torch, i.e. the caller's ``opt.step()`` line, however many
    wrappers sit between (their number changes with the torch version).

    Returns:
        The ``stacklevel``.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def as_dtype(value, name: str) -> torch.dtype | None:
    """``value`` as a ``torch.dtype``: a dtype, ``None``, or its name (``"float32"``,
    ``"torch.float64"``: how ``gnrev train --opt factor_dtype=float32`` passes it).

    Args:
        value: A dtype, ``None`` or a dtype name.
        name: Option name for the error message.

    Returns:
        The dtype or ``None``.

    Raises:
        ValueError: For an unknown dtype name.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"{name} must be a torch dtype or its name (e.g. 'float32'), got {value!r}")


def is_low_precision(dtype: torch.dtype) -> bool:
    """bfloat16/float16 (fewer than 32 bits): the Gauss-Newton step then runs in its
    ``factor_dtype`` and rounds ``θ + Δθ`` to ``dtype`` once.

    Args:
        dtype: A floating dtype.

    Returns:
        Whether it has fewer than 32 bits.
    """
    return dtype.is_floating_point and dtype.itemsize < 4


def validate_gn_options(owner: str, lr: float, loss: str, ce_target: str) -> None:
    r"""Raise ``ValueError`` for a non-positive/non-finite ``lr``, an unsupported ``loss`` or an
    unknown cross-entropy Newton target.

    Args:
        owner: Optimizer name for the message.
        lr: Step size :math:`\alpha`.
        loss: ``"cross_entropy"`` or ``"mse"``.
        ce_target: Cross-entropy Newton target name.

    Raises:
        ValueError: For an invalid option.
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if loss not in LOSSES:
        raise ValueError(f"unsupported loss {loss!r}; {owner} supports {LOSSES}")
    if ce_target not in CE_TARGETS:
        raise ValueError(f"unknown ce_target {ce_target!r}; choose from {CE_TARGETS}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` unless every entry of ``t`` is finite.

    Args:
        name: Tensor name for the message.
        t: The tensor.

    Raises:
        NonFiniteError: If an entry is ``nan`` or ``inf``.
    """
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"non-finite {name}; the parameters were not changed")


def check_all_finite(named: dict[str, torch.Tensor]) -> None:
    r"""Raise :class:`NonFiniteError` naming the first non-finite tensor of ``named``; one host
    synchronisation for all of them.

    Args:
        named: Name :math:`\to` tensor.

    Raises:
        NonFiniteError: If an entry is ``nan`` or ``inf``.
    """
    if not named:
        return
    flags = torch.stack([torch.isfinite(t).all() for t in named.values()]).tolist()
    for name, ok in zip(named, flags, strict=True):
        if not ok:
            raise NonFiniteError(f"non-finite {name}; the parameters were not changed")


@torch.no_grad()
def apply_update(optimizer: torch.optim.Optimizer,
                 pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    r""":math:`\theta \leftarrow (1 - \alpha\lambda_{\mathrm{wd}})\,\theta + \Delta\theta` (decoupled weight
    decay), counting steps.

    All ``Δθ`` are checked finite first (one host synchronisation), so a non-finite update
    changes nothing. A ``Δθ`` in a wider dtype than ``θ`` (low-precision parameters) is added in
    the wider dtype and the sum rounded once to ``θ``'s dtype.

    Args:
        optimizer: The optimizer whose groups hold ``lr`` and ``weight_decay``.
        pairs: ``(θ, Δθ)`` pairs.

    Raises:
        NonFiniteError: If a :math:`\Delta\theta` is not finite (nothing is changed).
    """
    pairs = list(pairs)
    if pairs and not bool(torch.stack([torch.isfinite(d).all() for _, d in pairs]).all()):
        raise NonFiniteError("non-finite Gauss-Newton update; the parameters were not changed")
    group = optimizer.param_groups[0]
    wd = group["weight_decay"]
    for p, d in pairs:
        if wd:
            p.mul_(1.0 - group["lr"] * wd)
        p.add_(d.reshape(p.shape))
        st = optimizer.state[p]
        st["step"] = st.get("step", 0) + 1
