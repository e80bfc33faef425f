"""Gaussian weight noise, and the noise family's common part (``σ²`` per group, ``samples``, a
seeded generator) that the trace penalties share."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import grad

from .base import Params, SharpnessOptimizer, check_int, check_number, make_generator
from .base_optimizer import BaseFactory

__all__ = ["NoisyRegularizer", "WeightNoise"]


class NoisyRegularizer(SharpnessOptimizer):
    r"""Weight noise and the trace penalties: ``σ²`` per group, ``samples``, a seeded generator.

    Args:
        params: Parameters or groups.
        sigma2: :math:`\sigma^2 \ge 0`.
        samples: Number :math:`k` of draws per step.
        base: Base optimizer class.
        base_kwargs: Its keyword arguments.
        ablate_nme: Drop :math:`\varphi''` (the NME) from second derivatives.
        seed: Seed of the optimizer's generator.
        model: The model (default: found from ``params``).
        loss: ``"cross_entropy"`` or ``"mse"``.
        method_options: Further per-group options of the method.
        **base_options: Options of the base optimizer.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], sigma2: float = 1e-4, *,
                 samples: int = 1, base: BaseFactory = torch.optim.SGD,
                 base_kwargs: Mapping | None = None, ablate_nme: bool = False,
                 seed: int | None = None, model: nn.Module | None = None,
                 loss: str = "cross_entropy", method_options: Mapping | None = None,
                 **base_options: Any) -> None:
        check_number("sigma2", sigma2)
        check_int("samples", samples)
        super().__init__(params, dict(sigma2=sigma2, samples=samples, ablate_nme=ablate_nme,
                                      **dict(method_options or {})),
                         base=base, base_kwargs=base_kwargs, model=model, loss=loss,
                         base_options=base_options)
        for g in self.param_groups:
            self._validate_group(g)
        self._gen = make_generator(seed, self._params())

    def _validate_group(self, group: dict) -> None:
        check_number("sigma2", group["sigma2"])
        check_int("samples", group["samples"])

    def _std(self) -> dict[str, float]:
        return {n: math.sqrt(s) for n, s in self._per_param("sigma2").items()}

    def _normal_like(self, theta: Params, scale: Mapping[str, float], k: int | None = None
                     ) -> Params:
        """``scale_p · ξ_p``, ``ξ ∼ N(0, I)`` (with a leading dimension ``k`` if given)."""
        out = {}
        for n, t in theta.items():
            shape = t.shape if k is None else (k, *t.shape)
            out[n] = scale[n] * torch.randn(shape, generator=self._gen, device=t.device,
                                            dtype=t.dtype)
        return out


class WeightNoise(NoisyRegularizer):
    r"""Gaussian weight noise: :math:`d = \frac{1}{k}\sum_j \nabla L(\theta + \varepsilon_j)`,
    :math:`\varepsilon_j \sim \mathcal{N}(0, \sigma^2 I)`.

    The objective is ``E_ε L(θ+ε) = L + (σ²/2) tr H + O(σ⁴)`` (Bishop's expansion, which keeps
    the NME). ``sigma2`` is the variance ``σ²`` (the noise's standard deviation is ``√σ²``).
    Cost: ``k`` gradients plus one forward for ``L(θ)``.

    Args:
        params: parameters or groups (a group may set its own ``sigma2``).
        sigma2: ``σ² ≥ 0``.
        samples: ``k`` noise draws averaged per step (the paper: 1).
        seed: seed of the optimizer's own ``torch.Generator`` (``None``: drawn from torch's
            global RNG); its state is in :meth:`state_dict`.
        base, base_kwargs, base_options, ablate_nme, model, loss: as :class:`SAM`.

    ``step(closure)`` with a SAM-style closure (any loss) perturbs ``θ`` in place, calls the
    closure, restores ``θ`` and steps the base; it returns the closure's loss at ``θ + ε``.
    """

    def sample_perturbation(self) -> Params:
        r"""One draw :math:`\varepsilon \sim \mathcal{N}(0, \Sigma)`,
        :math:`\Sigma = \operatorname{diag}(\sigma_p^2 I)`, from the optimizer's generator.

        Returns:
            Parameter name :math:`\to` :math:`\varepsilon_p`.
        """
        return self._normal_like(self._theta(), self._std())

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        out, records = self._records(x)
        loss = self._criterion(out, y)
        loss_fn = self._loss_with(records)
        k = self._option("samples")
        d = {n: torch.zeros_like(t) for n, t in theta.items()}
        eps_all = []
        for _ in range(k):
            eps = self.sample_perturbation()
            eps_all.append(eps)
            gk = grad(loss_fn)({n: theta[n] + eps[n] for n in theta}, x, y)
            for n in d:
                d[n] += gk[n] / k
        self.last_step_info = {"loss": float(loss)}
        self.last_probes = {"epsilon": eps_all}
        return loss, d

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        r"""Step on :math:`d = \frac{1}{k}\sum_j \nabla L(\theta + \varepsilon_j)`.

        Args:
            closure: SAM-style closure (any loss), or ``None`` for the drop-in step.

        Returns:
            The loss (at :math:`\theta + \varepsilon` with a closure, :math:`L(\theta)` without).
        """
        if closure is None:
            return super().step()
        if self._option("ablate_nme"):
            raise ValueError("WeightNoise(ablate_nme=True) cannot linearise the activations "
                             "through a closure; call step() after loss.backward() (drop-in) or "
                             "step_on_batch(x, y)")
        params = self._params()
        k = self._option("samples")
        acc = [torch.zeros_like(p) for p in params]
        saved = [p.detach().clone() for p in params]
        eps_all, loss = [], None
        try:
            for _ in range(k):
                eps = self.sample_perturbation()
                eps_all.append(eps)
                for p in params:
                    p.add_(eps[self._names[id(p)]])
                with torch.enable_grad():
                    loss = closure()
                for a, p, s in zip(acc, params, saved, strict=True):
                    if p.grad is not None:
                        a.add_(p.grad, alpha=1.0 / k)
                    p.copy_(s)
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
            self._capture.batch = None
        for p, a in zip(params, acc, strict=True):
            p.grad = a
        self.last_probes = {"epsilon": eps_all}
        self.base_optimizer.step()
        return loss
