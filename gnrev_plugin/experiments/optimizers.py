"""Optimizers of the reproduction (exact GN, Adam, SGD), their reference learning rates and one
training step that also measures the per-batch loss change.

Step-size convention (stated once, used everywhere): ``lr`` of ``exact_gn`` is the function-space
step ``α`` of :class:`gnrev_plugin.optim.ExactGN`: the linearised logit change on the batch is
``J Δθ = −α ε`` with ``ε = softmax(F) − onehot(y)`` (cross-entropy, the reference's
``use_identity`` target). The reference code applies every block's full right-inverse update and
steps with SGD, so its effective step is ``α = L · lr_ref`` (``L`` blocks); the defaults below
translate its released learning rates this way (MNIST, ``L = 2``: full batch ``lr_ref = 0.5 → α =
1.0``; mini-batch ``0.1 → α = 0.2``). Adam and SGD use the reference values unchanged
(Adam ``1e-4``, SGD ``0.1``; no momentum, no weight decay).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OPTIMIZERS", "REFERENCE_LR", "reference_lr", "make_optimizer", "StepResult",
           "train_step", "exact_gn_available"]

OPTIMIZERS = ("exact_gn", "adam", "sgd")

#: Learning rates of the released MNIST configs (reference convention; see module docstring).
REFERENCE_LR = {
    "full_batch": {"exact_gn": 0.5, "adam": 1e-4, "sgd": 0.1},
    "mini_batch": {"exact_gn": 0.1, "adam": 1e-4, "sgd": 0.1},
}


def reference_lr(optimizer: str, setting: str, num_blocks: int) -> float:
    """The reference learning rate in this package's convention (``α = L · lr_ref`` for GN)."""
    if setting not in REFERENCE_LR:
        raise ValueError(f"setting must be one of {sorted(REFERENCE_LR)}, got {setting!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    lr = REFERENCE_LR[setting][optimizer]
    return lr * num_blocks if optimizer == "exact_gn" else lr


def exact_gn_available() -> bool:
    try:
        from gnrev_plugin.optim import ExactGN  # noqa: F401
    except ImportError:
        return False
    return True


def make_optimizer(name: str, model: nn.Module, lr: float,
                   rank_policy: str = "warn") -> torch.optim.Optimizer:
    """``exact_gn`` (:class:`~gnrev_plugin.optim.ExactGN`, cross-entropy), ``adam`` or ``sgd``.

    ``rank_policy`` is passed to ExactGN: ``"warn"`` keeps training when a per-layer system is
    rank-deficient and records ``last_step_exact = False`` (logged as ``exact_frac``).
    """
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "exact_gn":
        try:
            from gnrev_plugin.optim import ExactGN
        except ImportError as err:
            raise ImportError("exact_gn needs gnrev_plugin.optim.ExactGN, which is not "
                              "available in this installation") from err
        return ExactGN(model.parameters(), lr=lr, loss="cross_entropy", model=model,
                       rank_policy=rank_policy)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


@dataclass
class StepResult:
    """``loss_before = ℓ_B(θ_t)``, ``loss_after = ℓ_B(θ_{t+1})`` on the same batch ``B``;
    ``pct_change = 100 (ℓ_B(θ_{t+1}) − ℓ_B(θ_t)) / ℓ_B(θ_t)`` (Buffelli et al., Fig. 3)."""

    loss_before: float
    loss_after: float
    exact: bool | None

    @property
    def pct_change(self) -> float:
        return 100.0 * (self.loss_after - self.loss_before) / self.loss_before


def train_step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> StepResult:
    """One optimizer step on ``(x, y)`` with the mean cross-entropy, then the loss re-evaluated
    on the same batch. ExactGN uses its explicit path ``step_on_batch`` (no parameter backward);
    the others the usual ``zero_grad / backward / step``."""
    exact = None
    if hasattr(opt, "step_on_batch"):
        with warnings.catch_warnings():  # recorded in last_step_exact (logged as exact_frac)
            warnings.filterwarnings("ignore", message="ExactGN step is not exact")
            loss_before = float(opt.step_on_batch(x, y))
        exact = getattr(opt, "last_step_exact", None)
    else:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss_before = float(loss.detach())
    with torch.no_grad():
        loss_after = float(F.cross_entropy(model(x), y))
    return StepResult(loss_before, loss_after, None if exact is None else bool(exact))
