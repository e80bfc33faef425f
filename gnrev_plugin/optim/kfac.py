"""KFAC: natural-gradient / Gauss-Newton steps with a Kronecker-factored curvature (Martens & Grosse, 2015),
on curvlinops 3.0.1's public ``KFACLinearOperator`` and ``KFACInverseLinearOperator``.

For a linear layer ``z = W̄ ā`` with ``W̄ = [W, b]`` and ``ā = [a; 1]``, on the batch ``B`` of ``N``
samples with mean loss ``L_B``, the layer's block of the Gauss-Newton matrix is approximated by

.. math::
    \\tilde F = A \\otimes G, \\qquad
    A = \\frac{1}{N} \\sum_n \\bar a_n \\bar a_n^\\top, \\qquad
    G = \\sum_n B_n^\\top \\, \\nabla^2_{F_n} L_B \\, B_n, \\quad B_n = \\partial F_n / \\partial z_n

(``fisher_type="type-2"``: the exact loss Hessian, a deterministic GGN; ``"mc"``: ``G`` from
``mc_samples`` labels drawn from the model's predictive distribution, the Fisher), in the
row-major ordering of ``vec W̄`` (``torch.kron(G, A)``). One step is

.. math::
    \\Delta\\theta = -\\eta \\, (\\tilde F + \\lambda I)^{-1} \\nabla L_B ,

with the damping added exactly (curvlinops' ``use_exact_damping=True``: through the eigenbases of
``A`` and ``G``, ``(A ⊗ G + λI)⁻¹ = (Q_A ⊗ Q_G)(Λ_A ⊗ Λ_G + λI)⁻¹(Q_A ⊗ Q_G)ᵀ``, not the
factored ``(A + √λ I) ⊗ (G + √λ I)`` heuristic). The factors are recomputed on the current batch
every ``update_interval`` steps and reused in between (no running average across batches).
Every trained parameter must sit in an ``nn.Linear`` or ``nn.Conv2d`` (curvlinops' KFAC).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
from torch import nn

from .capture import suspended
from .common import apply_update
from .curvature_batch import BatchCurvatureOptimizer, loss_module

__all__ = ["KFAC", "FISHER_TYPES"]

#: curvlinops' ``FisherType`` values offered here.
FISHER_TYPES = ("type-2", "mc", "empirical")


class KFAC(BatchCurvatureOptimizer):
    """``Δθ = −η (Ã⊗G + λI)⁻¹ ∇L_B`` per layer (module docstring).

    Args:
        params: parameters to update (a single group; each in an ``nn.Linear``/``nn.Conv2d``).
        lr: ``η``.
        model: the module (found from ``params`` if omitted).
        loss: ``"cross_entropy"`` or ``"mse"`` (mean reduction).
        damping: ``λ > 0``, added to ``Ã⊗G`` exactly.
        update_interval: recompute the Kronecker factors every this many steps.
        fisher_type: ``"type-2"`` (exact GGN factors), ``"mc"`` or ``"empirical"``.
        mc_samples: labels drawn per sample for ``fisher_type="mc"``.
        weight_decay: decoupled, ``θ ← (1 − η·wd)θ + Δθ``.
        seed: seed of curvlinops' label sampler (``"mc"``).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1.0, *,
                 model: nn.Module | None = None, loss: str = "cross_entropy", damping: float = 1e-3,
                 update_interval: int = 1, fisher_type: str = "type-2", mc_samples: int = 1,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping!r}")
        if int(update_interval) < 1:
            raise ValueError(f"update_interval must be >= 1, got {update_interval!r}")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"unknown fisher_type {fisher_type!r}; choose from {FISHER_TYPES}")
        defaults = dict(lr=lr, damping=float(damping), update_interval=int(update_interval),
                        fisher_type=fisher_type, mc_samples=int(mc_samples),
                        weight_decay=weight_decay, seed=int(seed))
        super().__init__(params, defaults, model, loss)
        self._kfac: KFACLinearOperator | None = None
        self._inverse: KFACInverseLinearOperator | None = None
        self._inverse_damping: float | None = None
        self._steps = 0

    def kronecker_operator(self, x: torch.Tensor, y: torch.Tensor) -> KFACLinearOperator:
        """curvlinops' KFAC operator ``⊕_ℓ A_ℓ ⊗ G_ℓ`` on ``(x, y)`` (factors computed now).

        Args:
            x: the batch inputs.
            y: the loss targets.

        Returns:
            The ``KFACLinearOperator`` (weights and biases of a layer treated jointly).
        """
        group = self.param_groups[0]
        with suspended(), torch.enable_grad():
            op = KFACLinearOperator(
                self.model, loss_module(group["loss"]), self.params, [(x, y)],
                check_deterministic=False, seed=group["seed"], fisher_type=group["fisher_type"],
                mc_samples=group["mc_samples"] if group["fisher_type"] == "mc" else 1,
                separate_weight_and_bias=False, num_data=len(x))
            op.compute_kronecker_factors()
        return op

    def _update(self, x: torch.Tensor, y: torch.Tensor, grads: list, loss: torch.Tensor) -> None:
        group = self.param_groups[0]
        if self._kfac is None or self._steps % group["update_interval"] == 0:
            self._kfac, self._inverse = self.kronecker_operator(x, y), None
        if self._inverse is None or self._inverse_damping != group["damping"]:
            self._inverse = KFACInverseLinearOperator(self._kfac, damping=group["damping"],
                                                      use_exact_damping=True)
            self._inverse_damping = group["damping"]
        direction = self._inverse @ [g.detach() for g in grads]
        apply_update(self, [(p, -group["lr"] * d) for p, d in zip(self.params, direction, strict=True)])
        self._steps += 1
        self.last_step_info = {"loss": float(loss), "damping": group["damping"],
                               "factors_recomputed": self._steps % group["update_interval"] == 1
                               or group["update_interval"] == 1}
