"""SAM and PSAM (the gradient-norm penalty): the ascent ``ε_p = ρ_p g_p/‖g‖``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import grad, grad_and_value, jvp

from .base import Params, SharpnessOptimizer, check_number, norm
from .base_optimizer import BaseFactory

__all__ = ["SAM", "PSAM"]


class _Ascent(SharpnessOptimizer):
    """SAM and PSAM: the ascent ``ε_p = ρ_p g_p/‖g‖``."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], rho: float = 0.05, *,
                 base: BaseFactory = torch.optim.SGD, base_kwargs: Mapping | None = None,
                 ablate_nme: bool = False, model: nn.Module | None = None,
                 loss: str = "cross_entropy", **base_options: Any) -> None:
        check_number("rho", rho)
        super().__init__(params, dict(rho=rho, ablate_nme=ablate_nme), base=base,
                         base_kwargs=base_kwargs, model=model, loss=loss,
                         base_options=base_options)
        for g in self.param_groups:
            self._validate_group(g)

    def _validate_group(self, group: dict) -> None:
        check_number("rho", group["rho"])

    def _ascent(self, g: Params) -> tuple[Params, torch.Tensor]:
        gnorm = norm(g)
        inv = torch.where(gnorm > 0, 1.0 / gnorm.clamp_min(torch.finfo(gnorm.dtype).tiny),
                          torch.zeros_like(gnorm))
        rho = self._per_param("rho")
        return {n: rho[n] * inv * t for n, t in g.items()}, gnorm


class SAM(_Ascent):
    r"""Sharpness-aware minimisation (Foret et al.), one ascent step.

    ``ε = ρ ĝ``, ``d = ∇L(θ + ε)``; the base steps from ``d`` at ``θ``. Cost: 2 gradients.

    With ``ablate_nme=True`` the gradient at ``θ + ε`` is that of the model whose activations are
    frozen at first order around ``θ`` (module docstring), ``∇L + ρ H_abl ĝ + O(ρ²)``.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        rho: ``ρ ≥ 0``, the radius of the ascent step.
        base: the base optimizer: a ``torch.optim.Optimizer`` subclass (default
            ``torch.optim.SGD``) or a factory ``(param_groups, **options) -> Optimizer``
            (registry names such as ``"gnrev.sgd"`` through the registry).
        base_kwargs, base_options: the base's options (``lr=0.1``, ``momentum=0.9``...), as a
            dict or as keywords; they live in the shared ``param_groups``.
        ablate_nme: remove ``φ''`` from the perturbed gradient's second-order part.
        model, loss: the model and ``"cross_entropy"``/``"mse"`` (runners pass both).

    ``step(closure)`` with the usual SAM closure (zero grads, forward, backward, return loss)
    works for any loss: it calls the closure at ``θ`` (for ``∇L(θ)``; gradients already present
    are ignored) and at ``θ + ε``, restores ``θ`` and steps the base from ``∇L(θ + ε)``; it
    returns the loss at ``θ``. Without a closure it is the drop-in step on the captured batch
    (module docstring).
    """

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        records = self._records(x)[1] if self._linearisation is not None else None
        g, loss = grad_and_value(self._loss)(theta, x, y)
        eps, gnorm = self._ascent(g)
        d = grad(self._loss_with(records))({n: theta[n] + eps[n] for n in theta}, x, y)
        self.last_step_info = {"loss": float(loss), "grad_norm": float(gnorm)}
        self.last_probes = {"epsilon": eps}
        return loss, d

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        r"""Step on :math:`\nabla L(\theta + \rho \hat g)`.

        Args:
            closure: SAM-style closure, or ``None`` for the drop-in step.

        Returns:
            The loss at :math:`\theta` before the step.
        """
        if closure is None:
            return super().step()
        if self._option("ablate_nme"):
            raise ValueError("SAM(ablate_nme=True) cannot linearise the activations through a "
                             "closure; call step() after loss.backward() (drop-in) or "
                             "step_on_batch(x, y)")
        params = self._params()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        g = {self._names[id(p)]: (p.grad if p.grad is not None else torch.zeros_like(p))
             for p in params}
        eps, gnorm = self._ascent(g)
        saved = [p.detach().clone() for p in params]
        try:
            for p in params:
                p.add_(eps[self._names[id(p)]])
            with torch.enable_grad():
                closure()
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
            self._capture.batch = None
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.last_step_info = {"grad_norm": float(gnorm)}
        self.last_probes = {"epsilon": eps}
        self.base_optimizer.step()
        return loss


class PSAM(_Ascent):
    r"""Penalty SAM, the gradient-norm penalty :math:`L + \rho\lVert\nabla L\rVert`:
    :math:`d = \nabla L + \rho H \hat g`.

    The first-order Taylor expansion of SAM's ``∇L(θ + ρĝ)``; ``H ĝ`` is one Hessian-vector
    product (``torch.func.jvp`` of ``torch.func.grad``), so the NME enters:
    ``H ĝ = G ĝ + NME ĝ``. Cost: 1 gradient + 1 HVP. With ``ablate_nme=True``:
    ``d = ∇L + ρ H_abl ĝ``, the φ''-free HVP (equal to ``H ĝ`` for ReLU).

    Args: as :class:`SAM`. ``step()`` is the drop-in step (a ``closure``, if given, is called
    first and its batch used).
    """

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        records = self._records(x)[1] if self._linearisation is not None else None
        g, loss = grad_and_value(self._loss)(theta, x, y)
        eps, gnorm = self._ascent(g)
        loss_fn = self._loss_with(records)
        _, h_eps = jvp(lambda t: grad(loss_fn)(t, x, y), (theta,), (eps,))
        self.last_step_info = {"loss": float(loss), "grad_norm": float(gnorm)}
        self.last_probes = {"epsilon": eps}
        return loss, {n: g[n] + h_eps[n] for n in g}

