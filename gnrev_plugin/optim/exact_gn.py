"""ExactGN: the exact Gauss-Newton optimizer for reversible networks (a ``torch.optim.Optimizer``).

One step on a batch ``(X, Y)`` with outputs ``F`` and Newton target ``ε = H⁻¹g``
(:mod:`gnrev_plugin.optim.targets`) sets

    Δθ = −α J† ε,     so that the linearised output change is   J Δθ = −α ε,

where ``J†`` is the per-block right inverse of :mod:`gnrev_plugin.optim.right_inverse`
(``J J† = I``; its row-space projection is the Moore-Penrose step ``J⁺ε``). Cost: one forward pass,
``2L`` Grams ``A Aᵀ`` (``O(n²M)`` each) and ``2L − 1`` JVPs, about one gradient step.

**Step-size conventions.** ``step_convention="function_space"`` (default): ``α = lr``; ``α = 1``
interpolates the batch to first order (MSE residual contracts as ``1 − α``).
``"reference"``: ``α = L·lr`` for ``L`` participating blocks, the reference code's convention (each
block reproduces the whole target), so its learning rates can be reused; the reference's MSE target
was ``2(F − Y)``, so its MSE learning rates correspond to ``2·lr`` here.

**Weight decay** is decoupled: ``θ ← (1 − lr·wd) θ + Δθ``.

**Exactness contract.** ``rank_policy="raise"`` (default) raises :class:`RankDeficiencyError` when no
block's systems have full row rank; rank-deficient blocks otherwise contribute a least-squares part
and the full-rank blocks absorb the rest, so the step stays exact. ``"strict"`` raises on any
rank-deficient per-layer system; ``"warn"`` warns and takes the least-squares step. The outcome is in
``last_step_exact`` and ``last_step_info``. A non-finite loss, target or update raises
:class:`NonFiniteError`. Parameters are unchanged whenever a step raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from ..nn.revmlp import RevMLP, find_revmlp_owning
from .capture import OutputCapture
from .common import apply_update, check_finite, validate_gn_options
from .right_inverse import RANK_POLICIES, right_inverse
from .solvers import SolverConfig
from .targets import mean_loss, newton_target

__all__ = ["ExactGN", "exact_gn_direction", "STEP_CONVENTIONS"]

STEP_CONVENTIONS = ("function_space", "reference")


def _recorded_activations(model: RevMLP):
    """The block activations the RevMLP recorded in the forward pass the capture just saw."""
    return model.last_activations


def exact_gn_direction(
    model: RevMLP,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    solver: str = "cholesky",
    rank_policy: str = "raise",
    **solver_options,
) -> list[torch.Tensor]:
    """``Δθ`` with ``J Δθ = target`` for an output-space ``target`` shaped like ``model(x)``.

    Returns one tensor per entry of ``model.parameters()`` (same order and shapes). This is the
    function-space primitive behind :class:`ExactGN` (which uses ``target = −α ε``).
    """
    with torch.no_grad():
        _, acts = model.features_with_activations(x)
        res = right_inverse(model, acts, target, SolverConfig(solver, **solver_options),
                            rank_policy=rank_policy)
    return [t for idx in range(len(model.blocks)) for t in res.updates[idx].tensors()]


class ExactGN(torch.optim.Optimizer):
    """Exact Gauss-Newton for a :class:`~gnrev_plugin.nn.RevMLP` (module docstring for the math).

    Args:
        params: the model's parameters (all four tensors of each participating block), or a
            single param group. The owning RevMLP is found automatically (or pass ``model``).
        lr: ``α`` (see the step-size conventions).
        loss: ``"mse"`` or ``"cross_entropy"``.
        model: the RevMLP, if it cannot or should not be found from ``params``.
        solver: ``"cholesky"`` (default), ``"eigh"``, ``"svd"`` or ``"damped"``
            (:mod:`gnrev_plugin.optim.solvers`).
        damping: ``λ`` for ``solver="damped"``: ``Λ = (A Aᵀ + λI)⁻¹ E``.
        rtol, atol: singular-value truncation of ``"eigh"``/``"svd"`` (reference: 1e-2, 1e-5).
        rank_rtol: numerical-rank threshold on Gram eigenvalues/pivots (default ``max(n, 100)·eps``).
        gram_dtype: dtype to form the Grams in (default: the working dtype).
        ce_target: cross-entropy Newton target, ``"identity"`` (reference default), ``"pinv"``
            (``H⁺g``) or ``"damped"`` (``(H + ce_damping·I)⁻¹g``).
        step_convention: ``"function_space"`` (``α = lr``) or ``"reference"`` (``α = L·lr``).
        weight_decay: decoupled weight decay coefficient.
        rank_policy: ``"raise"``, ``"strict"`` or ``"warn"`` (exactness contract).
        verify: after each step, recompute ``J Δθ`` from ``Δθ`` and record the relative residual
            in ``last_step_info["relative_residual"]`` (costs about one extra forward pass).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1.0,
        *,
        loss: str = "mse",
        model: RevMLP | None = None,
        solver: str = "cholesky",
        damping: float = 0.0,
        rtol: float = 0.0,
        atol: float = 0.0,
        rank_rtol: float | None = None,
        gram_dtype: torch.dtype | None = None,
        ce_target: str = "identity",
        ce_damping: float = 1e-3,
        step_convention: str = "function_space",
        weight_decay: float = 0.0,
        rank_policy: str = "raise",
        verify: bool = False,
    ) -> None:
        validate_gn_options("ExactGN", lr, loss, ce_target)
        if step_convention not in STEP_CONVENTIONS:
            raise ValueError(f"unknown step_convention {step_convention!r}; choose from "
                             f"{STEP_CONVENTIONS}")
        if rank_policy not in RANK_POLICIES:
            raise ValueError(f"unknown rank_policy {rank_policy!r}; choose from {RANK_POLICIES}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        SolverConfig(solver, rtol, atol, damping, rank_rtol, gram_dtype)  # validates
        defaults = dict(lr=lr, weight_decay=weight_decay, loss=loss, solver=solver,
                        damping=damping, rtol=rtol, atol=atol, rank_rtol=rank_rtol,
                        ce_target=ce_target, ce_damping=ce_damping,
                        step_convention=step_convention, rank_policy=rank_policy)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("ExactGN takes a single parameter group: the step is one joint "
                             "function-space update, so per-group learning rates are undefined")
        group_params = self.param_groups[0]["params"]
        if model is None:
            model = find_revmlp_owning(group_params)
        if not isinstance(model, RevMLP):
            raise TypeError(f"ExactGN needs a reversible gnrev_plugin.nn.RevMLP, got "
                            f"{type(model).__name__}; for any nn.Module use DenseGN")
        self.model = model
        self._gram_dtype = gram_dtype
        self.verify = verify
        self.blocks = self._participating_blocks(model, group_params)
        self._capture = OutputCapture(model, extra=_recorded_activations)
        model.record_activations = True
        self.last_step_exact: bool | None = None
        self.last_step_info: dict = {}

    @staticmethod
    def _participating_blocks(model: RevMLP, params: list[torch.Tensor]) -> list[int]:
        given = {id(p) for p in params}
        owned = {id(p) for p in model.parameters()}
        if not given <= owned:
            raise ValueError("some parameters passed to ExactGN do not belong to the RevMLP")
        blocks = []
        for i, block in enumerate(model.blocks):
            ids = [id(p) for p in block.parameters()]
            hit = sum(j in given for j in ids)
            if hit == len(ids):
                blocks.append(i)
            elif hit:
                raise ValueError(f"block {i}: pass all of W_f, b_f, W_g, b_g or none of them "
                                 "(the exact step solves for whole half-layers)")
        if not blocks:
            raise ValueError("ExactGN got no trainable block parameters")
        for i in blocks:
            if not all(p.requires_grad for p in model.blocks[i].parameters()):
                raise ValueError(f"block {i} has parameters with requires_grad=False")
        return blocks

    # -- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drop-in step: uses the forward/backward the training loop just ran.

        ``closure`` (optional, torch.optim style) re-runs ``zero_grad``, forward, loss and
        ``backward`` and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch, call = self._capture.consume(self.defaults["loss"])
        group = self.param_groups[0]
        ls = float(call.options.get("label_smoothing", 0.0) or 0.0)
        check_finite("model output", batch.output)
        if call.target.is_floating_point():
            check_finite("targets", call.target)
        eps = newton_target(group["loss"], batch.output, call.target,
                            ce_target=group["ce_target"], ce_damping=group["ce_damping"],
                            label_smoothing=ls)
        self._apply(batch.extra, eps)
        return loss

    @torch.no_grad()
    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Explicit fast path: forward without autograd, then the GN step; no parameter backward.

        Returns the mean-reduced loss on ``(x, y)`` before the step.
        """
        group = self.param_groups[0]
        z, acts = self.model.features_with_activations(x)
        out = z if self.model.readout is None else z @ self.model.readout
        loss = mean_loss(group["loss"], out, y)
        check_finite("loss", loss)
        if y.is_floating_point():
            check_finite("targets", y)
        eps = newton_target(group["loss"], out, y, ce_target=group["ce_target"],
                            ce_damping=group["ce_damping"])
        self._apply(acts, eps)
        return loss

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model."""
        self._capture.close()
        self.model.record_activations = False
        self.model.last_activations = None

    # -- internals --------------------------------------------------------------------------
    def _apply(self, acts, eps: torch.Tensor) -> None:
        check_finite("Newton target", eps)
        group = self.param_groups[0]
        alpha = group["lr"] * (len(self.blocks) if group["step_convention"] == "reference" else 1)
        config = SolverConfig(group["solver"], group["rtol"], group["atol"], group["damping"],
                              group["rank_rtol"], self._gram_dtype)
        res = right_inverse(self.model, acts, -alpha * eps, config, self.blocks,
                            group["rank_policy"], verify=self.verify)
        deltas = [(p, d) for idx in self.blocks
                  for p, d in zip(self.model.blocks[idx].parameters(), res.updates[idx].tensors(),
                                      strict=True)]
        if not res.exact and group["rank_policy"] == "warn":
            warnings.warn("ExactGN step is not exact Gauss-Newton: "
                          + "; ".join(f"block {b.block}: rank(A_f)={b.rank_f}, rank(A_g)="
                                      f"{b.rank_g} of n={b.n}" for b in res.blocks
                                      if not b.full_rank)
                          + (" (damped solver)" if group["solver"] == "damped" else ""),
                          RuntimeWarning, stacklevel=3)
        apply_update(self, deltas)
        self.last_step_exact = res.exact
        self.last_step_info = {**res.report(), "alpha": alpha, "solver": group["solver"]}


