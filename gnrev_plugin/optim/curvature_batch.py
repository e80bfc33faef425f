"""The batch plumbing shared by the curvlinops-based second-order optimizers
(:class:`~gnrev_plugin.optim.KFAC`, :class:`~gnrev_plugin.optim.HessianFree`).

Both need, on the current mini-batch ``B = (X, Y)`` with mean loss
``L_B(θ) = (1/|B|) Σ_{n∈B} ℓ(F(x_n; θ), y_n)``, the gradient ``∇L_B`` and a curvature operator built on
``B``. They offer the two protocols every runner uses (:mod:`gnrev_plugin.stepping`):

* drop-in: ``loss.backward(); opt.step()``. The model output, its input ``X`` and the loss target ``Y``
  are captured by :class:`~gnrev_plugin.optim.capture.OutputCapture` (as for :class:`DenseGN`); the
  gradient is the one ``backward()`` left in ``p.grad``;
* explicit: ``opt.step_on_batch(X, Y)`` computes ``∇L_B`` itself and returns ``L_B(θ)``.

curvlinops' operators get a fresh ``nn.MSELoss()`` / ``nn.CrossEntropyLoss()`` (mean reduction) and the
plain model, never a BackPACK-extended one (``host_ecosystem.md`` §2.7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..nn.discovery import find_module_owning
from .capture import OutputCapture, autocast_disabled, suspended
from .common import check_finite
from .protocols import BATCH_STEP
from .targets import LOSSES, mean_loss

__all__ = ["BatchCurvatureOptimizer", "loss_module"]


def loss_module(loss: str) -> nn.Module:
    """The mean-reduced torch loss module curvlinops' operators are built with.

    Args:
        loss: ``"mse"`` or ``"cross_entropy"``.

    Returns:
        ``nn.MSELoss()`` or ``nn.CrossEntropyLoss()``.
    """
    if loss == "mse":
        return nn.MSELoss()
    if loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    raise ValueError(f"unsupported loss {loss!r}; choose from {LOSSES}")


class BatchCurvatureOptimizer(torch.optim.Optimizer):
    """A single-group optimizer whose step needs the batch: subclasses implement
    :meth:`_update(x, y, grads, loss)` and apply the update themselves."""

    #: :mod:`gnrev_plugin.optim.protocols`: ``step_on_batch`` (no Gauss-Newton output-space system,
    #: no process group)
    capabilities = frozenset({BATCH_STEP})

    def __init__(self, params: Iterable, defaults: dict, model: nn.Module | None, loss: str) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unsupported loss {loss!r}; choose from {LOSSES}")
        lr = defaults.get("lr")
        if not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        super().__init__(params, {**defaults, "loss": loss})
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes a single parameter group")
        self.params = list(self.param_groups[0]["params"])
        self.model = model if model is not None else find_module_owning(self.params)
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(self.model).__name__}")
        owned = {id(p) for p in self.model.parameters()}
        if any(id(p) not in owned for p in self.params):
            raise ValueError(f"parameters passed to {type(self).__name__} are not in the model")
        self._capture = OutputCapture(self.model)
        self.last_step_info: dict = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drop-in step after ``loss.backward()`` (or with a torch.optim-style ``closure``): the
        batch is the one of the last captured forward pass, the gradient is ``p.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with autocast_disabled(self.model):
            batch, call = self._capture.consume(self.param_groups[0]["loss"])
            if call.options.get("label_smoothing"):
                raise ValueError(f"{type(self).__name__} does not support label smoothing")
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params]
            value = mean_loss(self.param_groups[0]["loss"], batch.output, call.target)
            self._update(batch.inputs, call.target, grads, value)
        return loss

    @torch.no_grad()
    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Explicit step on ``(x, y)``; returns the mean loss ``L_B(θ)`` before the step."""
        with autocast_disabled(self.model):
            value, grads = self.loss_and_grad(x, y)
            self._update(x, y, grads, value)
        return value

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model."""
        self._capture.close()

    # -- helpers for subclasses ---------------------------------------------------------------
    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``L_B(θ)`` (detached) and ``∇_θ L_B`` for the optimized parameters."""
        with torch.enable_grad(), suspended():
            value = mean_loss(self.param_groups[0]["loss"], self.model(x), y)
            grads = torch.autograd.grad(value, self.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]
        check_finite("loss", value)
        return value.detach(), grads

    @torch.no_grad()
    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L_B`` at the current parameters (no autograd, nothing captured)."""
        with suspended():
            return mean_loss(self.param_groups[0]["loss"], self.model(x), y)

    def _update(self, x: torch.Tensor, y: torch.Tensor, grads: list, loss: torch.Tensor) -> None:
        raise NotImplementedError
