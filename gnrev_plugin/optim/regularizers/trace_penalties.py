"""The Hessian-trace (Hutchinson) and Gauss-Newton-trace (sampled labels) penalties."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from ..capture import suspended
from .base import Params, check_int, dot
from .base_optimizer import BaseFactory
from .linearisation import Record
from .noise import NoisyRegularizer

__all__ = ["HessianTracePenalty", "GNTracePenalty", "PROBES"]

#: Hutchinson probe distributions (both have ``E vvᵀ = I``).
PROBES = ("gaussian", "rademacher")


class HessianTracePenalty(NoisyRegularizer):
    r"""The Hessian-trace penalty :math:`L + \frac{\sigma^2}{2} \operatorname{tr} H` with Hutchinson's
    estimator.

    ``d = ∇_θ[L(θ) + ½ (1/k) Σ_i v_iᵀ H(θ) v_i]`` with ``v_i = σ z_i`` held fixed, ``z_i ∼ N(0, I)``
    (``probes="gaussian"``, the paper's) or Rademacher; ``E_z zᵀHz = tr H``, so
    ``E d = ∇L + (σ²/2) ∇ tr H``. Each ``vᵀHv`` is ``⟨v, jvp(grad L)(θ; v)⟩`` (``torch.func``),
    vectorised over the ``k`` probes with ``vmap`` and differentiated once more. Cost: ``k`` HVPs
    and their gradient. The paper uses ``k = 1`` (and 5 in a follow-up).

    With ``ablate_nme=True`` the penalty is ``(σ²/2) tr H_abl`` (``φ'' = 0`` at ``θ``) and its
    gradient drops ``φ''`` and ``φ'''``.

    Args: as :class:`WeightNoise`, plus ``probes``: ``"gaussian"`` or ``"rademacher"``.
    ``step()`` is the drop-in step (a ``closure``, if given, is called first).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], sigma2: float = 1e-4, *,
                 samples: int = 1, probes: str = "gaussian", base: BaseFactory = torch.optim.SGD,
                 base_kwargs: Mapping | None = None, ablate_nme: bool = False,
                 seed: int | None = None, model: nn.Module | None = None,
                 loss: str = "cross_entropy", **base_options: Any) -> None:
        if probes not in PROBES:
            raise ValueError(f"probes must be one of {PROBES}, got {probes!r}")
        super().__init__(params, sigma2, samples=samples, base=base, base_kwargs=base_kwargs,
                         ablate_nme=ablate_nme, seed=seed, model=model, loss=loss,
                         method_options={"probes": probes}, **base_options)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if group["probes"] not in PROBES:
            raise ValueError(f"probes must be one of {PROBES}, got {group['probes']!r}")

    def sample_probes(self, k: int) -> Params:
        r"""``k`` unit-variance probes ``z`` (leading dimension ``k``), from the generator.

        Args:
            k: Number of probes.

        Returns:
            Parameter name :math:`\to` ``(k, *shape)`` probes :math:`z`.
        """
        theta = self._theta()
        z = self._normal_like(theta, {n: 1.0 for n in theta}, k)
        if self._option("probes") == "rademacher":
            z = {n: torch.where(t >= 0, 1.0, -1.0).to(t.dtype) for n, t in z.items()}
        return z

    def _quadratic_forms(self, loss_fn: Callable, theta: Params, x: torch.Tensor,
                         y: torch.Tensor, v: Params) -> torch.Tensor:
        """``(v_iᵀ H(θ) v_i)_i`` for the stacked probes ``v``."""
        def one(vi: Params) -> torch.Tensor:
            _, hv = jvp(lambda t: grad(loss_fn)(t, x, y), (theta,), (vi,))
            return dot(vi, hv)

        return vmap(one)(v)

    def hessian_trace_samples(self, x: torch.Tensor, y: torch.Tensor, num: int) -> torch.Tensor:
        r"""``num`` independent Hutchinson terms ``z_iᵀ H z_i`` (``H_abl`` with ``ablate_nme``),
        each unbiased for ``tr H``, with the probes this optimizer draws.

        Args:
            x: Input batch.
            y: Targets.
            num: Number of terms.

        Returns:
            ``(num,)`` tensor of :math:`z_i^\top H z_i`.
        """
        self._check_batch(x, y)
        check_int("num", num)
        self._sync_linearisation()
        with torch.no_grad(), suspended(), self._maybe_linearised():
            records = self._records(x)[1]
            return self._quadratic_forms(self._loss_with(records), self._theta(), x, y,
                                         self.sample_probes(num)).detach()

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        records = self._records(x)[1] if self._linearisation is not None else None
        k = self._option("samples")
        std = self._std()
        z = self.sample_probes(k)
        v = {n: std[n] * t for n, t in z.items()}
        penalised = self._loss_with(records)

        def total(t: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            loss = self._loss(t, x, y)
            if all(s == 0 for s in std.values()):
                pen = torch.zeros_like(loss)
            else:
                pen = 0.5 * self._quadratic_forms(penalised, t, x, y, v).mean()
            return loss + pen, (loss, pen)

        d, (loss, pen) = grad(total, has_aux=True)(theta)
        self.last_step_info = {"loss": float(loss), "penalty": float(pen)}
        s2 = set(self._per_param("sigma2").values())
        if len(s2) == 1 and (s := s2.pop()) > 0:
            self.last_step_info["hessian_trace_estimate"] = float(2 * pen / s)
        self.last_probes = {"probes": z}
        return loss, d


class GNTracePenalty(NoisyRegularizer):
    r"""The Gauss-Newton-trace penalty :math:`L + \frac{\sigma^2}{2} \operatorname{tr} G` with sampled labels.

    ``d = ∇_θ[L(θ) + ½ (1/k) Σ_j (1/B) Σ_n ‖Σ^{1/2} ∇_θ ℓ(z_n(θ), ŷ_{n,j})‖²]``, ``Σ = σ² I``, with the
    labels ``ŷ`` drawn at ``θ`` and held fixed: ``ŷ ∼ Cat(softmax z_n)`` for cross-entropy,
    ``ŷ = z_n + √(C/2) ξ`` for MSE (module docstring); ``E_ŷ (1/B) Σ_n ‖∇ℓ(z_n, ŷ_n)‖² = tr G``.
    This is the weight-noise expansion with the NME dropped. Per-example gradients come from
    ``vmap(grad)``. Cost: ``k`` per-example gradient passes and their gradient; no HVP. The paper
    uses one sampled label per example (``samples=1``).

    With ``ablate_nme=True`` the penalty's value is unchanged (``G`` has no ``φ''``) and its
    gradient drops ``φ''``.

    Args: as :class:`WeightNoise`. ``step()`` is the drop-in step.
    """

    def sample_labels(self, z: torch.Tensor, k: int) -> torch.Tensor:
        r"""``k`` sampled targets per example from the model's predictive distribution at logits
        ``z``: ``(k, B)`` class indices (cross-entropy) or ``(k, B, C)`` (MSE).

        Args:
            z: Logits :math:`z`, ``(B, C)``.
            k: Number of samples.

        Returns:
            Sampled targets :math:`\hat y`.
        """
        z = z.detach()
        if self.loss_kind == "cross_entropy":
            probs = torch.softmax(z.double(), dim=1)
            return torch.multinomial(probs, k, replacement=True, generator=self._gen).T.contiguous()
        noise = torch.randn((k, *z.shape), generator=self._gen, device=z.device, dtype=z.dtype)
        return z + math.sqrt(z.shape[1] / 2.0) * noise

    def _per_example_terms(self, theta: Params, x: torch.Tensor, labels: torch.Tensor,
                           records: list[Record] | None, weight: Mapping[str, float]
                           ) -> torch.Tensor:
        """``((1/B) Σ_n Σ_p w_p ‖∇_p ℓ(z_n, ŷ_{n,j})‖²)_j`` for the ``k`` label sets ``labels``,
        with the activations linearised at ``records`` (per-example slices) when given."""
        lin = self._linearisation

        def single(t: Params, xn: torch.Tensor, yn: torch.Tensor, rec: Any) -> torch.Tensor:
            if rec is None:
                return self._loss(t, xn.unsqueeze(0), yn.unsqueeze(0))
            lin.use(rec)
            try:
                return self._loss(t, xn.unsqueeze(0), yn.unsqueeze(0))
            finally:
                lin.use(None)

        per_example = vmap(grad(single), in_dims=(None, 0, 0, None if records is None else 0))

        def one_set(yj: torch.Tensor) -> torch.Tensor:
            per = per_example(theta, x, yj, records)
            return sum(weight[n] * (t * t).sum() for n, t in per.items()) / len(x)

        return vmap(one_set)(labels)

    def gn_trace_samples(self, x: torch.Tensor, y: torch.Tensor, num: int) -> torch.Tensor:
        r"""``num`` independent estimates ``(1/B) Σ_n ‖∇_θ ℓ(z_n, ŷ_n)‖²`` (one label per example
        each), drawn as the penalty draws them; each is unbiased for ``tr G``. ``y`` is only
        checked (the labels are sampled).

        Args:
            x: Input batch.
            y: Targets (checked only).
            num: Number of estimates.

        Returns:
            ``(num,)`` tensor of estimates of :math:`\operatorname{tr} G`.
        """
        self._check_batch(x, y)
        check_int("num", num)
        with torch.no_grad(), suspended():
            z = self.model(x)
            labels = self.sample_labels(z, num)
            theta = self._theta()
            return self._per_example_terms(theta, x, labels, None,
                                           {n: 1.0 for n in theta}).detach()

    def _direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        theta = self._theta()
        z, records = self._records(x)
        k = self._option("samples")
        labels = self.sample_labels(z, k)
        sigma2 = self._per_param("sigma2")

        def total(t: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            loss = self._loss(t, x, y)
            if all(s == 0 for s in sigma2.values()):
                pen = torch.zeros_like(loss)
            else:
                pen = 0.5 * self._per_example_terms(t, x, labels, records, sigma2).mean()
            return loss + pen, (loss, pen)

        d, (loss, pen) = grad(total, has_aux=True)(theta)
        self.last_step_info = {"loss": float(loss), "penalty": float(pen)}
        s2 = set(sigma2.values())
        if len(s2) == 1 and (s := s2.pop()) > 0:
            self.last_step_info["gn_trace_estimate"] = float(2 * pen / s)
        self.last_probes = {"labels": labels}
        return loss, d
