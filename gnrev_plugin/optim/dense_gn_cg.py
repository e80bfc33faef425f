"""DenseGN's matrix-free step: preconditioned CG on the output-space system, no Jacobian formed.

.. math::

    (J J^\top + \\lambda I)\\, \\Lambda = -\alpha\\, \\mathrm{vec}\\,\varepsilon, \\qquad
    \\Delta\theta = J^\top \\Lambda,

with one JVP and one VJP per iteration (:class:`~gnrev_plugin.optim.cg.JacobianProducts`),
memory :math:`O(P + nC)`. The step is exact only when the *true* residual
:math:`\\lVert J\\Delta\theta + \alpha\varepsilon\rVert / \\lVert\alpha\varepsilon\rVert`, recomputed
with a separate JVP after the solve, meets ``cg_tol`` (and :math:`\\lambda = 0`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .capture import suspended
from .cg import JacobianProducts, block_preconditioner, conjugate_gradient
from .common import apply_update, caller_stacklevel, check_finite
from .errors import RankDeficiencyError
from .gram import factored_diagonal, factored_sample_blocks
from .gram.capture import capture_factors, plan_layers
from .targets import mean_loss, newton_target

__all__ = ["step_cg", "cg_preconditioner", "BatchStatisticsOnly", "BATCH_COUPLING"]

#: modules whose training-mode forward couples the samples of a batch
BATCH_COUPLING = (nn.modules.batchnorm._BatchNorm,)


def cg_preconditioner(opt, x: torch.Tensor, dtype: torch.dtype | None):
    """``(preconditioner for conjugate_gradient, its name)``: exact per-sample blocks or
    diagonal of ``J Jᵀ`` when every trained parameter is in a structured layer and the
    samples are independent, else ``(None, "none")``."""
    group = opt.param_groups[0]
    kind = group["cg_preconditioner"]
    layers, generic = plan_layers(opt.model, opt.names)
    if kind == "none" or generic or opt._coupled():
        return None, "none"
    f = opt._forward_functional(x, dtype)
    with suspended():
        _, factors, _ = capture_factors(f, opt._trained(dtype), x, layers)
    budget, fdt = group["max_memory_mb"], group["factor_dtype"]
    if kind == "diagonal":
        diag = sum(factored_diagonal(fa, max_memory_mb=budget) for fa in factors)
        return diag.to(fdt) + group["damping"], kind
    blocks = sum(factored_sample_blocks(fa, max_memory_mb=budget) for fa in factors)
    return block_preconditioner(blocks.to(fdt), group["damping"]), kind

def step_cg(opt, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Matrix-free step (module docstring): CG on ``(J Jᵀ + λI) Λ = −α vec ε``."""
    group = opt.param_groups[0]
    opt._check_model()
    dtype = opt._compute_dtype()
    if dtype is not None:
        x = x.to(dtype) if x.is_floating_point() else x
        y = y.to(dtype) if y.is_floating_point() else y
    with suspended(), BatchStatisticsOnly(opt.model):
        ops = JacobianProducts(opt._forward_functional(x, dtype), opt._trained(dtype), x)
        out = ops.output
        if out.dim() != 2:
            raise ValueError(f"DenseGN expects outputs of shape (n, C), got "
                             f"{tuple(out.shape)}")
        loss = mean_loss(group["loss"], out, y)
        check_finite("model output", out)
        check_finite("loss", loss)
        eps = newton_target(group["loss"], out, y, ce_target=group["ce_target"],
                            ce_damping=group["ce_damping"], label_smoothing=label_smoothing)
        fdt = group["factor_dtype"]
        b = (-group["lr"] * eps).reshape(-1).to(fdt)
        pre, pre_name = cg_preconditioner(opt, x, dtype)
        lam = group["damping"]
        result = conjugate_gradient(lambda v: ops.gram_matvec(v) + lam * v, b,
                                    preconditioner=pre, tol=group["cg_tol"],
                                    max_iter=group["cg_max_iter"])
        delta = ops.vjp(result.solution)
        true_res = float((ops.jvp(delta).to(fdt) - b).norm() / b.norm().clamp_min(1e-300))
    exact = group["damping"] == 0 and true_res <= group["cg_tol"]
    report = {"exact": exact, "n_outputs": b.numel(), "jacobian": "matrix_free",
              "cg_iterations": result.iterations, "true_residual": true_res,
              "recursive_residual": result.recursive_residual,
              "preconditioner": pre_name, **opt._note()}
    if not exact and group["damping"] == 0 and group["rank_policy"] == "raise":
        raise RankDeficiencyError(
            f"CG reached a true residual ‖JΔθ + αε‖/‖αε‖ = {true_res:.2e} > cg_tol = "
            f"{group['cg_tol']:g} after {result.iterations} iterations (rank-deficient J Jᵀ "
            "or too few iterations); raise cg_max_iter or use rank_policy='warn'")
    if not exact and group["rank_policy"] == "warn":
        warnings.warn(f"DenseGN CG step is not exact Gauss-Newton (true residual "
                      f"{true_res:.2e}, cg_tol {group['cg_tol']:g}, damping "
                      f"{group['damping']})", RuntimeWarning, stacklevel=caller_stacklevel())
    apply_update(opt, zip(opt.params, [delta[n] for n in opt.names], strict=True))
    opt.last_step_exact = exact
    opt.last_step_info = report
    return loss


class BatchStatisticsOnly:
    """BatchNorm layers in training mode use batch statistics without updating running ones
    (so the Jacobian pass neither mutates buffers inside ``torch.func`` nor double-counts)."""

    def __init__(self, model: nn.Module) -> None:
        self.mods = [m for m in model.modules() if isinstance(m, BATCH_COUPLING) and m.training]

    def __enter__(self) -> None:
        self.saved = [(m.running_mean, m.running_var, m.track_running_stats) for m in self.mods]
        for m in self.mods:
            m.running_mean = m.running_var = None
            m.track_running_stats = False

    def __exit__(self, *exc) -> None:
        for m, (mean, var, track) in zip(self.mods, self.saved, strict=True):
            m.running_mean, m.running_var, m.track_running_stats = mean, var, track

