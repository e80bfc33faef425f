"""One training step as every runner takes it (``gnrev train``/``reproduce``, the benchopt solvers).

An optimizer with ``step_on_batch(x, target)`` (the Gauss-Newton family's explicit path, no
parameter backward) is stepped through it; any other through the standard
``zero_grad(); loss.backward(); step()``. The loss is then re-evaluated on the same batch, which
gives the per-batch percentage loss change of Buffelli et al. (Fig. 3)

    Δ_B = 100 · (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)      (percent; negative = the step helped).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StepResult", "train_step"]


@dataclass
class StepResult:
    """``loss_before = ℓ_B(θ_t)``, ``loss_after = ℓ_B(θ_{t+1})`` on the same batch ``B``, and the
    optimizer's ``last_step_exact`` (``None`` for optimizers that do not report one)."""

    loss_before: float
    loss_after: float
    exact: bool | None

    @property
    def pct_change(self) -> float:
        """``Δ_B`` in percent; ``nan`` when ``ℓ_B(θ_t) = 0``."""
        if self.loss_before == 0:
            return math.nan
        return 100.0 * (self.loss_after - self.loss_before) / self.loss_before


def train_step(opt, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor,
               target: torch.Tensor) -> StepResult:
    """One optimizer step on ``(x, target)``, then ``ℓ_B`` re-evaluated on the same batch.

    A rank-deficient Gauss-Newton step is recorded in the optimizer's ``last_step_exact`` (the
    runners log the fraction of exact steps), so its warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* step is not exact Gauss-Newton")
        if callable(getattr(opt, "step_on_batch", None)):
            loss_before = float(opt.step_on_batch(x, target))
        else:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), target)
            loss.backward()
            opt.step()
            loss_before = float(loss.detach())
    exact = getattr(opt, "last_step_exact", None)
    with torch.no_grad():
        loss_after = float(loss_fn(model(x), target))
    return StepResult(loss_before, loss_after, None if exact is None else bool(exact))
