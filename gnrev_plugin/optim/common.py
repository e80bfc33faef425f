"""Checks and the parameter update shared by :class:`ExactGN` and :class:`DenseGN`."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import NonFiniteError
from .targets import CE_TARGETS, LOSSES

__all__ = ["validate_gn_options", "check_finite", "apply_update"]


def validate_gn_options(owner: str, lr: float, loss: str, ce_target: str) -> None:
    """Raise ``ValueError`` for a non-positive/non-finite ``lr``, an unsupported ``loss`` or an
    unknown cross-entropy Newton target."""
    if not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if loss not in LOSSES:
        raise ValueError(f"unsupported loss {loss!r}; {owner} supports {LOSSES}")
    if ce_target not in CE_TARGETS:
        raise ValueError(f"unknown ce_target {ce_target!r}; choose from {CE_TARGETS}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` unless every entry of ``t`` is finite."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"non-finite {name}; the parameters were not changed")


@torch.no_grad()
def apply_update(optimizer: torch.optim.Optimizer,
                 pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``θ ← (1 − lr·wd) θ + Δθ`` (decoupled weight decay) for each ``(θ, Δθ)``, counting steps.

    All ``Δθ`` are checked finite first, so a non-finite update changes nothing.
    """
    pairs = list(pairs)
    for _, d in pairs:
        check_finite("Gauss-Newton update", d)
    group = optimizer.param_groups[0]
    wd = group["weight_decay"]
    for p, d in pairs:
        if wd:
            p.mul_(1.0 - group["lr"] * wd)
        p.add_(d.reshape(p.shape))
        st = optimizer.state[p]
        st["step"] = st.get("step", 0) + 1
