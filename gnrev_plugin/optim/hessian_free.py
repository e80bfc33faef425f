"""Hessian-free optimization (Martens, 2010): truncated conjugate gradient on the damped Gauss-Newton
system of each batch, with Levenberg-Marquardt damping, on curvlinops 3.0.1's public
``GGNLinearOperator`` and ``CGInverseLinearOperator``.

On the batch ``B`` with mean loss ``L_B``, gradient ``g = ∇L_B`` and GGN ``G = Jᵀ (∇²_F L_B) J``,
CG started at ``δ₀ = ζ δ_prev`` (warm start, ``cg_warm_start = ζ``) runs at most ``cg_max_iter``
iterations (relative residual ``cg_tol``) on

.. math::
    (G + \\lambda I)\\, \\delta = g, \\qquad \\Delta\\theta = -\\eta\\, \\delta ,

optionally preconditioned (``preconditioner="martens"``: ``M = (\\mathrm{diag}\\sum_n (\\nabla\\ell_n/N)^2
+ \\lambda)^{3/4}``, Martens 2010 §4.7). With ``λ → 0`` and enough iterations the step is the exact
Gauss-Newton step ``−η G⁺ g`` (CG from ``0`` stays in the Krylov space of ``g`` ⊂ range ``G``, so it
converges to the minimum-norm solution).

Levenberg-Marquardt adaptation (Martens 2010 §4.1): with the step ``s = Δθ``, the actual reduction
``L_B(θ + s) − L_B(θ)`` and the reduction predicted by the undamped quadratic model
``q(s) = gᵀs + ½ sᵀ G s`` (Martens & Sutskever 2012, §8.5), ``ρ = actual / q(s)`` and

.. math::
    \\rho < \\tfrac14 \\Rightarrow \\lambda \\leftarrow \\tfrac32 \\lambda, \\qquad
    \\rho > \\tfrac34 \\Rightarrow \\lambda \\leftarrow \\tfrac23 \\lambda

(``damping_increase = 3/2``, ``damping_decrease = 2/3``; ``λ`` never below ``min_damping``). A step
that increases ``L_B`` or makes it non-finite is undone when ``reject_uphill`` (the damping still
grows). Every hyperparameter, including the adapted ``λ``, lives in ``param_groups[0]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from curvlinops import CGInverseLinearOperator, GGNLinearOperator
from torch import nn
from torch.func import functional_call, grad, vmap

from ..compat.curvlinops import PyTorchLinearOperator
from .capture import suspended
from .common import apply_update
from .curvature_batch import BatchCurvatureOptimizer, loss_module
from .distributed import flatten, unflatten
from .targets import mean_loss

__all__ = ["HessianFree", "PRECONDITIONERS"]

PRECONDITIONERS = ("none", "martens")


class _DampedOperator(PyTorchLinearOperator):
    """``G + λI`` for a curvlinops operator ``G`` (lazy)."""

    SELF_ADJOINT = True

    def __init__(self, G: PyTorchLinearOperator, damping: float) -> None:
        super().__init__(G._in_shape, G._out_shape)
        self._G, self._damping = G, damping

    @property
    def device(self) -> torch.device:
        return self._G.device

    @property
    def dtype(self) -> torch.dtype:
        return self._G.dtype

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        return [gx + self._damping * x for gx, x in zip(self._G._matmat(X), X, strict=True)]

    def _adjoint(self) -> _DampedOperator:
        return self


class HessianFree(BatchCurvatureOptimizer):
    """Truncated-CG Gauss-Newton with Levenberg-Marquardt damping (module docstring).

    Args:
        params: parameters to update (a single group).
        lr: ``η`` (1 is Martens' step; the damping controls the step length).
        model: the module (found from ``params`` if omitted).
        loss: ``"cross_entropy"`` or ``"mse"`` (mean reduction).
        damping: initial ``λ ≥ 0`` (adapted when ``adapt_damping``).
        cg_max_iter: CG iteration cap (truncation).
        cg_tol: CG stops when the relative residual ``‖r‖/‖g‖`` is below this.
        cg_warm_start: ``ζ``: CG starts from ``ζ`` times the previous solution (0: from zero).
        preconditioner: ``"none"`` or ``"martens"`` (diagonal, from per-sample gradients).
        adapt_damping: apply the Levenberg-Marquardt rule.
        damping_increase, damping_decrease: the rule's factors (3/2 and 2/3).
        min_damping: lower bound of the adapted ``λ``.
        reject_uphill: undo a step that increases the batch loss.
        weight_decay: decoupled, ``θ ← (1 − η·wd)θ + Δθ``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1.0, *,
                 model: nn.Module | None = None, loss: str = "cross_entropy", damping: float = 1.0,
                 cg_max_iter: int = 50, cg_tol: float = 1e-4, cg_warm_start: float = 0.95,
                 preconditioner: str = "none", adapt_damping: bool = True,
                 damping_increase: float = 1.5, damping_decrease: float = 2.0 / 3.0,
                 min_damping: float = 1e-8, reject_uphill: bool = True,
                 weight_decay: float = 0.0) -> None:
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if int(cg_max_iter) < 1:
            raise ValueError(f"cg_max_iter must be >= 1, got {cg_max_iter!r}")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {preconditioner!r}; choose from {PRECONDITIONERS}")
        if not (damping_increase >= 1 >= damping_decrease > 0):
            raise ValueError("need damping_increase >= 1 >= damping_decrease > 0")
        defaults = dict(lr=lr, damping=float(damping), cg_max_iter=int(cg_max_iter),
                        cg_tol=float(cg_tol), cg_warm_start=float(cg_warm_start),
                        preconditioner=preconditioner, adapt_damping=bool(adapt_damping),
                        damping_increase=float(damping_increase),
                        damping_decrease=float(damping_decrease), min_damping=float(min_damping),
                        reject_uphill=bool(reject_uphill), weight_decay=weight_decay)
        super().__init__(params, defaults, model, loss)
        self._previous: torch.Tensor | None = None

    def ggn_operator(self, x: torch.Tensor, y: torch.Tensor) -> GGNLinearOperator:
        """curvlinops' GGN ``G = Jᵀ(∇²_F L_B)J`` of the mean loss on ``(x, y)``.

        Args:
            x: the batch inputs.
            y: the loss targets.

        Returns:
            The lazy ``GGNLinearOperator``.
        """
        group = self.param_groups[0]
        return GGNLinearOperator(self.model, loss_module(group["loss"]), self.params, [(x, y)],
                                 check_deterministic=False, num_data=len(x))

    def _martens_preconditioner(self, x: torch.Tensor, y: torch.Tensor, damping: float):
        """``r ↦ M⁻¹ r`` with ``M = (diag Σ_n (∇ℓ_n/N)² + λ)^{3/4}``."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        trained = {names[id(p)]: p.detach() for p in self.params}
        kind = self.param_groups[0]["loss"]

        def sample_loss(theta: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return mean_loss(kind, functional_call(self.model, theta, (xi[None],)), yi[None])

        with suspended(), torch.enable_grad():
            per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(trained, x, y)
        n = len(x)
        diag = flatten([(per_sample[names[id(p)]] / n).pow(2).sum(0) for p in self.params])
        inv = (diag + damping).pow(-0.75)
        return lambda r: inv[:, None] * r

    def _update(self, x: torch.Tensor, y: torch.Tensor, grads: list, loss: torch.Tensor) -> None:
        group = self.param_groups[0]
        lam_used = lam = group["damping"]
        G = self.ggn_operator(x, y)
        g = flatten([t.detach() for t in grads])
        options = dict(max_iter=group["cg_max_iter"], max_tridiag_iter=group["cg_max_iter"],
                       tolerance=group["cg_tol"])
        if self._previous is not None and group["cg_warm_start"] > 0:
            options["initial_guess"] = group["cg_warm_start"] * self._previous[:, None]
        if group["preconditioner"] == "martens":
            options["preconditioner"] = self._martens_preconditioner(x, y, lam)
        with suspended(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*CG terminated")  # truncation is intended
            delta = CGInverseLinearOperator(_DampedOperator(G, lam), **options) @ g
            step = -group["lr"] * delta
            curvature = float(step @ (G @ step))
        predicted = float(g @ step) + 0.5 * curvature
        deltas = unflatten(step, self.params)
        saved = [p.detach().clone() for p in self.params]
        apply_update(self, zip(self.params, deltas, strict=True))
        new_loss = float(self.batch_loss(x, y))
        actual = new_loss - float(loss)
        rho = actual / predicted if predicted < 0 else -math.inf
        rejected = group["reject_uphill"] and not (math.isfinite(new_loss) and actual <= 0)
        if rejected:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
        self._previous = delta.detach()
        if group["adapt_damping"]:
            if not rho >= 0.25:
                lam *= group["damping_increase"]
            elif rho > 0.75:
                lam *= group["damping_decrease"]
            group["damping"] = max(lam, group["min_damping"]) if lam > 0 else lam
        self.last_step_info = {"loss": float(loss), "loss_after": new_loss, "rho": rho,
                               "predicted_reduction": predicted, "damping_used": lam_used,
                               "damping_next": group["damping"], "rejected": rejected}
