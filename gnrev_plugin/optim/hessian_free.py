"""Hessian-free optimization (Martens, 2010): truncated conjugate gradient on the damped Gauss-Newton
system of each batch, with Levenberg-Marquardt damping; the GGN-vector products are curvlinops
3.0.1's public ``GGNLinearOperator``.

The CG loop is :func:`truncated_cg`, not curvlinops' ``CGInverseLinearOperator``: that one runs
GPyTorch's ``linear_cg``, which has no Martens progress rule and, in float64, stalls far from the
solution (measured with ``linear_operator`` as installed beside curvlinops 3.0.1, on a 31×31 SPD
system with eigenvalues ``logspace(−0.5, 2)``: max error 9·10⁻⁴ after 31 iterations, 4·10⁻⁶ after
124; :func:`truncated_cg` 1·10⁻³ after 31 and 8·10⁻¹⁵ after 62), which an exactness test at
``λ → 0`` cannot accept.

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
from collections.abc import Callable, Iterable

import torch
from curvlinops import GGNLinearOperator
from torch import nn
from torch.func import functional_call, grad, vmap

from .capture import suspended
from .common import apply_update
from .curvature_batch import BatchCurvatureOptimizer, loss_module
from .distributed import flatten, unflatten
from .targets import mean_loss

__all__ = ["HessianFree", "PRECONDITIONERS", "truncated_cg"]

PRECONDITIONERS = ("none", "martens")


def truncated_cg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                 max_iter: int, tol: float,
                 precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 progress_tol: float = 5e-4) -> tuple[torch.Tensor, int]:
    """Preconditioned conjugate gradient on ``A x = b`` from ``x0``, truncated (Martens 2010 §4.4).

    Stops after ``max_iter`` iterations, when ``‖r‖ ≤ tol·‖b‖``, or by Martens' progress rule on the
    quadratic ``φ(x) = ½ xᵀAx − bᵀx``: at iteration ``i > k = max(10, ⌈i/10⌉)`` with ``φ(x_i) < 0``
    and ``(φ(x_i) − φ(x_{i−k})) / φ(x_i) < k·ε`` (``ε = progress_tol``, Martens' ``5·10⁻⁴``;
    ``0`` turns the rule off).

    Args:
        matvec: ``v ↦ A v`` (``A`` symmetric positive semi-definite).
        b: right-hand side.
        x0: starting point.
        max_iter: iteration cap.
        tol: relative residual tolerance.
        precondition: ``r ↦ M⁻¹ r`` (``None``: ``M = I``).
        progress_tol: ``ε`` of the progress rule.

    Returns:
        ``(x, iterations)``.

    .. math::
        \\alpha_i = \\frac{r_i^\\top z_i}{p_i^\\top A p_i},\\;
        x_{i+1} = x_i + \\alpha_i p_i,\\; r_{i+1} = r_i - \\alpha_i A p_i,\\;
        z_{i+1} = M^{-1} r_{i+1},\\; p_{i+1} = z_{i+1} + \\frac{r_{i+1}^\\top z_{i+1}}{r_i^\\top z_i} p_i .
    """
    precondition = precondition or (lambda r: r)
    x = x0.clone()
    Ax = matvec(x) if bool(x.any()) else torch.zeros_like(x)
    r = b - Ax
    z = precondition(r)
    p, rz = z.clone(), float(r @ z)
    b_norm = float(b.norm())
    phi = [float(0.5 * x @ Ax - b @ x)]
    for i in range(1, max_iter + 1):
        if b_norm == 0 or float(r.norm()) <= tol * b_norm:
            return x, i - 1
        Ap = matvec(p)
        curvature = float(p @ Ap)
        if not curvature > 0:                 # no descent direction left (A p = 0)
            return x, i - 1
        alpha = rz / curvature
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        Ax.add_(Ap, alpha=alpha)
        phi.append(float(0.5 * x @ Ax - b @ x))
        k = max(10, math.ceil(0.1 * i))
        if i > k and phi[-1] < 0 and (phi[-1] - phi[-1 - k]) / phi[-1] < k * progress_tol:
            return x, i
        z = precondition(r)
        rz_new = float(r @ z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return x, max_iter


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
        cg_progress_tol: ``ε`` of Martens' progress rule (:func:`truncated_cg`; 0: off).
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
                 cg_max_iter: int = 50, cg_tol: float = 1e-4, cg_progress_tol: float = 5e-4,
                 cg_warm_start: float = 0.95,
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
                        cg_tol=float(cg_tol), cg_progress_tol=float(cg_progress_tol),
                        cg_warm_start=float(cg_warm_start),
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
        return lambda r: inv * r

    def _update(self, x: torch.Tensor, y: torch.Tensor, grads: list, loss: torch.Tensor) -> None:
        group = self.param_groups[0]
        lam_used = lam = group["damping"]
        G = self.ggn_operator(x, y)
        g = flatten([t.detach() for t in grads])
        x0 = torch.zeros_like(g)
        if self._previous is not None and group["cg_warm_start"] > 0:
            x0 = group["cg_warm_start"] * self._previous
        precondition = (self._martens_preconditioner(x, y, lam)
                        if group["preconditioner"] == "martens" else None)
        with suspended():
            delta, iterations = truncated_cg(lambda v: G @ v + lam * v, g, x0, group["cg_max_iter"],
                                             group["cg_tol"], precondition,
                                             group["cg_progress_tol"])
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
                               "damping_next": group["damping"], "rejected": rejected,
                               "cg_iterations": iterations}
