"""One training step and one evaluation as every runner takes them (``gnrev train``/``reproduce``,
the benchopt solvers and benchmark).

An optimizer with ``step_on_batch(x, target)`` (the Gauss-Newton family's explicit path, no
parameter backward) is stepped through it; any other through the standard
``zero_grad(); loss.backward(); step()``. The loss is then re-evaluated on the same batch, which
gives the per-batch percentage loss change of Buffelli et al. (Fig. 3)

    Δ_B = 100 · (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)      (percent; negative = the step helped).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StepResult", "train_step", "evaluate"]


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
               target: torch.Tensor, reevaluate: bool = True,
               reduce: Callable[[float, int], float] | None = None) -> StepResult:
    """One optimizer step on ``(x, target)``, then ``ℓ_B`` re-evaluated on the same batch
    (``reevaluate=False`` skips that forward pass; ``loss_after`` is then ``nan``).

    ``reduce(mean, n)``: when ``(x, target)`` is this process's shard of a global batch
    (``gnrev train --nproc``), turns a shard mean into the global-batch mean
    (:func:`gnrev_plugin.optim.distributed.mean_over_ranks`). ``step_on_batch`` already returns
    the global loss.

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
            if reduce is not None:
                loss_before = reduce(loss_before, len(x))
    exact = getattr(opt, "last_step_exact", None)
    loss_after = math.nan
    if reevaluate:
        with torch.no_grad():
            loss_after = float(loss_fn(model(x), target))
        if reduce is not None:
            loss_after = reduce(loss_after, len(x))
    return StepResult(loss_before, loss_after, None if exact is None else bool(exact))


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
             targets: torch.Tensor | None = None, chunk: int = 2048) -> tuple[float, float]:
    """Mean loss ``(1/n) Σ_i ℓ(F_i, t_i)`` and accuracy ``(1/n) Σ_i 1[argmax_c F_ic = y_i]`` of
    ``model`` in eval mode, in chunks; ``targets`` are the loss's targets (default ``y``, class
    indices for cross-entropy). ``(nan, nan)`` for an empty set."""
    if len(y) == 0:
        return math.nan, math.nan
    targets = y if targets is None else targets
    was_training = model.training
    model.eval()
    try:
        total_loss, correct = 0.0, 0
        for s in range(0, len(y), chunk):
            out = model(x[s:s + chunk])
            total_loss += float(loss_fn(out, targets[s:s + chunk])) * len(out)
            correct += int((out.argmax(1) == y[s:s + chunk]).sum())
    finally:
        model.train(was_training)
    return total_loss / len(y), correct / len(y)
