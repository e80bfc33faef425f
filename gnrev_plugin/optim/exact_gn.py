"""ExactGN: the exact Gauss-Newton optimizer for reversible networks (a ``torch.optim.Optimizer``).

One step on a batch ``(X, Y)`` with outputs ``F`` and Newton target ``ε = H⁻¹g``
(:mod:`gnrev_plugin.optim.targets`) sets

    Δθ = −α J† ε,     so that the linearised output change is   J Δθ = −α ε,

where ``J†`` is the per-block right inverse of :mod:`gnrev_plugin.optim.right_inverse`
(``J J† = I``; its row-space projection is the Moore-Penrose step ``J⁺ε``). Cost: one forward pass,
the Grams of the ``2L`` half-layer systems on their smaller side (``n×n``, ``(M+1)×(M+1)``, or
``(d/2+1)×(d/2+1)`` for a linear block; :mod:`gnrev_plugin.optim.solvers`), ``ΔW`` and the input
JVPs of the sweeps: about one gradient step.

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

**Honest flag.** ``last_step_exact`` is ``True`` only when every system of the exact shares meets
``residual_rtol``, measured a posteriori as ``‖E − AΔ‖/‖E‖`` from the update as applied; a miss
gets one float64 refinement step, and a block that still misses is handled like a rank-deficient
one. Bad input (an empty batch, integer or wrong-dtype inputs, out-of-range class indices, inputs
so large that the Grams overflow) raises a ``ValueError``/:class:`NonFiniteError` before any
work.

**Distributed.** When ``torch.distributed`` is initialised (``process_group="auto"``, the
default) the GN batch is the union of all ranks' local batches, in rank order. Each rank runs
the sweeps above on its own rows; the half-layer systems are row-split
(:mod:`gnrev_plugin.optim.distributed_solve`: Gram tiles per rank, each Gram factored on one
owner rank, ``ΔW = Σ_r S_rᵀΛ_r`` all-reduced, global residuals), so every rank applies the same
step and reports the global ``last_step_exact``. ``solver="svd"`` gathers the rows on rank 0
instead (:mod:`gnrev_plugin.optim.distributed`).

**Low-precision parameters.** With bfloat16/float16 parameters the step runs on a shadow copy of
the model in ``factor_dtype`` (float64 by default; float32 for devices without fast float64):
the forward pass that gives the features, the Newton target, the Grams, their factorisation and
the solves all run in ``factor_dtype`` at the (exactly representable) low-precision parameters,
and ``θ + Δθ`` is rounded once to the parameter dtype. The drop-in path recomputes its forward
in ``factor_dtype`` from the captured inputs (one extra forward pass).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from ..nn.revmlp import RevMLP, find_revmlp_owning
from . import distributed as gdist
from .block_gather import solve_on_root
from .capture import OutputCapture, autocast_disabled
from .common import (
    apply_update,
    as_dtype,
    caller_stacklevel,
    check_all_finite,
    validate_gn_options,
)
from .exact_gn_checks import check_inputs, check_targets, check_values, participating_blocks
from .protocols import BATCH_STEP, DISTRIBUTED, GAUSS_NEWTON
from .right_inverse import (
    RANK_POLICIES,
    right_inverse,
    step_forward,
)
from .shadow_model import LowPrecisionShadow
from .solvers import SolverConfig
from .targets import mean_loss, newton_target

__all__ = ["ExactGN", "exact_gn_direction", "STEP_CONVENTIONS"]

STEP_CONVENTIONS = ("function_space", "reference")

#: Solver defaults live in :class:`~gnrev_plugin.optim.solvers.SolverConfig` (one place).
_SOLVER = SolverConfig()

def _recorded_activations(model: RevMLP):
    """The block activations the RevMLP recorded in the forward pass the capture just saw."""
    return model.last_activations


def _solver_config(group: dict) -> SolverConfig:
    return SolverConfig(group["solver"], group["rtol"], group["atol"], group["damping"],
                        group["rank_rtol"], group["gram_dtype"], group["factor_dtype"],
                        group["residual_rtol"])


def exact_gn_direction(
    model: RevMLP,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    solver: str = _SOLVER.method,
    rank_policy: str = "raise",
    **solver_options,
) -> list[torch.Tensor]:
    r""":math:`\Delta\theta` with :math:`J \Delta\theta = \text{target}` for an output-space target shaped
    like ``model(x)``.

    Returns one tensor per entry of ``model.parameters()`` (same order and shapes). This is the
    function-space primitive behind :class:`ExactGN` (which uses ``target = −α ε``).
    ``solver_options`` are the other fields of :class:`~gnrev_plugin.optim.solvers.SolverConfig`.

    Args:
        model: The RevMLP.
        x: Input batch.
        target: Output-space target, shaped like ``model(x)``.
        solver: One of :data:`~gnrev_plugin.optim.solvers.SOLVERS`.
        rank_policy: One of ``RANK_POLICIES`` (``"raise"``, ``"strict"``, ``"warn"``; see the
            module docstring).
        **solver_options: Further :class:`~gnrev_plugin.optim.solvers.SolverConfig` fields.

    Returns:
        :math:`\Delta\theta` with :math:`J \Delta\theta = \text{target}`, one tensor per parameter.

    Raises:
        RankDeficiencyError: If the systems are rank-deficient as ``rank_policy`` forbids.
    """
    with torch.no_grad():
        z, acts = model.features_with_activations(x)
        res = right_inverse(model, acts, target, SolverConfig(solver, **solver_options),
                            rank_policy=rank_policy, inputs=x.reshape(x.shape[0], -1))
    return [t for idx in range(len(model.blocks)) for t in res.updates[idx].tensors()]


class ExactGN(torch.optim.Optimizer):
    """Exact Gauss-Newton for a :class:`~gnrev_plugin.nn.RevMLP` (module docstring for the math).

    Args:
        params: the model's parameters (all four tensors of each participating block), or a
            single param group. The owning RevMLP is found automatically (or pass ``model``).
        lr: ``α`` (see the step-size conventions).
        loss: ``"mse"`` or ``"cross_entropy"``.
        model: the RevMLP, if it cannot or should not be found from ``params``.
        solver: ``"cholesky"`` (default: the structure-aware dispatch), ``"eigh"``, ``"svd"`` or
            ``"damped"`` (:mod:`gnrev_plugin.optim.solvers`).
        damping: ``λ`` for ``solver="damped"``: ``Λ = (A Aᵀ + λI)⁻¹ E``.
        rtol, atol: singular-value truncation of ``"eigh"``/``"svd"`` (reference: 1e-2, 1e-5).
        rank_rtol: numerical-rank threshold on Gram eigenvalues/pivots (default ``max(m, 100)·eps``
            for an ``m×m`` Gram).
        gram_dtype: dtype to form the Grams in (default: the working dtype).
        factor_dtype: dtype the Grams are factored and solved in (default float64; dtypes may
            also be given by name, e.g. ``"float32"``). With
            bfloat16/float16 parameters the whole step runs in it (module docstring): float64,
            or float32 for devices without fast float64 (THE option for that).
        residual_rtol: accuracy every exactly solved system must reach, ``‖E − AΔ‖ ≤
            residual_rtol·‖E‖`` (default 1e-10 in float64, 1e-3 in float32); see
            ``last_step_exact``.
        ce_target: cross-entropy Newton target, ``"identity"`` (reference default), ``"pinv"``
            (``H⁺g``) or ``"damped"`` (``(H + ce_damping·I)⁻¹g``).
        step_convention: ``"function_space"`` (``α = lr``) or ``"reference"`` (``α = L·lr``).
        weight_decay: decoupled weight decay coefficient.
        rank_policy: ``"raise"``, ``"strict"`` or ``"warn"`` (exactness contract).
        verify: after each step, recompute ``J Δθ`` from ``Δθ`` and record the relative residual
            in ``last_step_info["relative_residual"]`` (costs about one extra forward pass).
        process_group: ``"auto"`` (the WORLD group when ``torch.distributed`` is initialised
            with several ranks), ``None`` (always a single-process step) or a process group: the
            GN batch is then the union of the group's local batches
            (:mod:`gnrev_plugin.optim.distributed`). Not a hyperparameter: not in
            ``param_groups`` or the state dict.

    Every option is a hyperparameter of the single param group (``opt.param_groups[0]``), saved
    and restored by ``state_dict``.

    Attributes:
        last_step_exact: ``True`` iff the last step took an exact share in at least one block and
            every solved system of the exact shares met ``residual_rtol``, measured a posteriori
            from the update as applied (after at most one float64 refinement step).
        last_step_info: the ranks, solve kinds, residuals and roles of every block
            (:class:`~gnrev_plugin.optim.right_inverse.BlockReport`), ``alpha``, ``solver``.
    """

    capabilities = frozenset({GAUSS_NEWTON, BATCH_STEP, DISTRIBUTED})

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1.0,
        *,
        loss: str = "mse",
        model: RevMLP | None = None,
        solver: str = _SOLVER.method,
        damping: float = _SOLVER.damping,
        rtol: float = _SOLVER.rtol,
        atol: float = _SOLVER.atol,
        rank_rtol: float | None = _SOLVER.rank_rtol,
        gram_dtype: torch.dtype | None = _SOLVER.gram_dtype,
        factor_dtype: torch.dtype = _SOLVER.factor_dtype,
        residual_rtol: float | None = _SOLVER.residual_rtol,
        ce_target: str = "identity",
        ce_damping: float = 1e-3,
        step_convention: str = "function_space",
        weight_decay: float = 0.0,
        rank_policy: str = "raise",
        verify: bool = False,
        process_group=gdist.AUTO,
    ) -> None:
        validate_gn_options("ExactGN", lr, loss, ce_target)
        if step_convention not in STEP_CONVENTIONS:
            raise ValueError(f"unknown step_convention {step_convention!r}; choose from "
                             f"{STEP_CONVENTIONS}")
        if rank_policy not in RANK_POLICIES:
            raise ValueError(f"unknown rank_policy {rank_policy!r}; choose from {RANK_POLICIES}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        gram_dtype = as_dtype(gram_dtype, "gram_dtype")
        factor_dtype = as_dtype(factor_dtype, "factor_dtype")
        defaults = dict(lr=lr, weight_decay=weight_decay, loss=loss, solver=solver,
                        damping=damping, rtol=rtol, atol=atol, rank_rtol=rank_rtol,
                        gram_dtype=gram_dtype, factor_dtype=factor_dtype,
                        residual_rtol=residual_rtol, ce_target=ce_target, ce_damping=ce_damping,
                        step_convention=step_convention, rank_policy=rank_policy,
                        verify=bool(verify))
        _solver_config(defaults)  # validates
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("ExactGN takes a single parameter group: the step is one joint "
                             "function-space update, so per-group learning rates are undefined")
        group_params = self.param_groups[0]["params"]
        if model is None:
            model = find_revmlp_owning(group_params)
        model = gdist.unwrap_model(model)
        if not isinstance(model, RevMLP):
            raise TypeError(f"ExactGN needs a reversible gnrev_plugin.nn.RevMLP, got "
                            f"{type(model).__name__}; for any nn.Module use DenseGN")
        self.model = model
        self.blocks = participating_blocks(model, group_params)
        self._capture = OutputCapture(model, extra=_recorded_activations)
        self._factor_cache: dict = {}
        self.process_group = process_group
        self._shadow = LowPrecisionShadow()
        model.record_activations = True
        self.last_step_exact: bool | None = None
        self.last_step_info: dict = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:      # state dicts saved before an option existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @property
    def verify(self) -> bool:
        r"""Whether each step recomputes :math:`J \Delta\theta` (the param group's ``verify``).

        Returns:
            The ``verify`` flag of the (single) param group.
        """
        return self.param_groups[0]["verify"]

    @verify.setter
    def verify(self, value: bool) -> None:
        self.param_groups[0]["verify"] = bool(value)

    # -- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drop-in step: uses the forward/backward the training loop just ran.

        ``closure`` (optional, torch.optim style) re-runs ``zero_grad``, forward, loss and
        ``backward`` and returns the loss.

        Args:
            closure: Re-runs forward, loss and backward; returns the loss.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with autocast_disabled(self.model):     # an opt.step() inside torch.autocast
            self._run(self._prepare_captured)
        return loss

    def _prepare_captured(self):
        """The drop-in step's local part: activations, Newton target, inputs (no loss)."""
        group = self.param_groups[0]
        batch, call = self._capture.consume(group["loss"])
        ls = float(call.options.get("label_smoothing", 0.0) or 0.0)
        x = batch.inputs.reshape(batch.inputs.shape[0], -1)
        labels = check_targets(group["loss"], call.target, batch.output.shape)
        named = {"model output": batch.output}
        if call.target.is_floating_point():
            named["targets"] = call.target
        check_values(x, named, labels, batch.output.shape[1])
        model = self._shadow.working_model(self.model, group["factor_dtype"])
        out, acts, target = batch.output, batch.extra, call.target
        if model is not self.model:               # low-precision parameters: recompute in
            x = x.to(model.blocks[0].f.weight.dtype)   # factor_dtype from the inputs
            z, acts = step_forward(model, x)
            out = z if model.readout is None else z @ model.readout
            if target.is_floating_point():
                target = target.to(out.dtype)
        eps = newton_target(group["loss"], out, target,
                            ce_target=group["ce_target"], ce_damping=group["ce_damping"],
                            label_smoothing=ls)
        check_all_finite({"Newton target": eps})
        return acts, eps, x, None

    @torch.no_grad()
    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Explicit fast path: forward without autograd, then the GN step; no parameter backward.

        A linear block is evaluated as ``Y1 = X1 + X2 (C_f W_fᵀ) + b_f`` (two ``(d/2)²M`` products
        instead of four ``n(d/2)M`` ones; its ``n×M`` features are never needed), so with a linear
        block the update agrees with the drop-in path's to rounding rather than bitwise.

        Returns the mean-reduced loss on ``(x, y)`` before the step.

        Raises:
            ValueError: an empty batch, non-floating or wrong-dtype inputs, wrong shapes, class
                indices out of range; :class:`NonFiniteError`: non-finite inputs, targets, loss
                or Newton target, or inputs so large that the Grams overflow. All before any work;
                the parameters are unchanged.

        Args:
            x: Input batch.
            y: Targets (class indices or values, as the loss takes them).

        Returns:
            The mean loss :math:`L(\theta)` before the step.
        """
        with autocast_disabled(self.model):
            return self._run(lambda: self._prepare_batch(x, y))

    def _prepare_batch(self, x, y):
        """The explicit step's local part: activations, Newton target, inputs, loss."""
        xf = check_inputs(self.model, x)
        group = self.param_groups[0]
        out_shape = (xf.shape[0], self.model.num_classes or self.model.in_features)
        labels = check_targets(group["loss"], y, out_shape)
        check_values(xf, {"targets": y} if y.is_floating_point() else {}, labels,
                           out_shape[1])
        model = self._shadow.working_model(self.model, group["factor_dtype"])
        if model is not self.model:               # low-precision parameters (module docstring)
            xf = xf.to(model.blocks[0].f.weight.dtype)
            if y.is_floating_point():
                y = y.to(xf.dtype)
        z, acts = step_forward(model, xf)
        out = z if model.readout is None else z @ model.readout
        loss = mean_loss(group["loss"], out, y)
        eps = newton_target(group["loss"], out, y, ce_target=group["ce_target"],
                            ce_damping=group["ce_damping"])
        check_all_finite({"loss": loss, "Newton target": eps})
        return acts, eps, xf, loss

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model.
        """
        self._capture.close()
        self.model.record_activations = False
        self.model.last_activations = None

    # -- internals --------------------------------------------------------------------------
    def _comm(self) -> gdist.Comm | None:
        group = gdist.resolve_group(self.process_group)
        return None if group is None else gdist.Comm(group, self.model.blocks[0].f.weight.device)

    def _run(self, prepare: Callable[[], tuple]) -> torch.Tensor | None:
        """One step from ``prepare() -> (acts, eps, inputs, loss)`` (the local part), alone or
        over the process group (:mod:`gnrev_plugin.optim.distributed`). Returns the (global,
        mean-reduced) loss, or ``None`` where ``prepare`` gives none."""
        comm = self._comm()
        if comm is None:
            acts, eps, x, loss = prepare()
            self._finish(*self._solve(self._shadow.current(self.model, x), acts, eps, x))
            return loss
        err = prepared = None
        try:
            prepared = prepare()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by agree()
            err = e
        n_local = 0 if prepared is None else prepared[2].shape[0]
        loss = None if prepared is None else prepared[3]
        total, n = comm.agree(err, 0.0 if loss is None else float(loss) * n_local, n_local)
        acts, eps, x, loss = prepared
        model = self._shadow.current(self.model, x)
        if self.param_groups[0]["solver"] == "svd":          # factors A itself: on the root
            like = [p for idx in self.blocks for p in self.model.blocks[idx].parameters()]
            self._finish(*solve_on_root(comm, self._solve, like, model, acts, eps, x))
        else:                                                # every rank its rows
            self._finish(*self._solve(model, acts, eps, x, comm))
        return None if loss is None else torch.as_tensor(total / n, dtype=loss.dtype,
                                                         device=loss.device)

    def _solve(self, model: RevMLP, acts, eps: torch.Tensor, inputs: torch.Tensor | None,
               comm: gdist.Comm | None = None) -> tuple[dict, list[torch.Tensor]]:
        """``Δθ = −α J† ε`` of the participating blocks (in their parameter order) and the step
        report (``last_step_info``); row-split over ``comm``'s ranks when given."""
        group = self.param_groups[0]
        alpha = group["lr"] * (len(self.blocks) if group["step_convention"] == "reference" else 1)
        res = right_inverse(model, acts, -alpha * eps, _solver_config(group), self.blocks,
                            group["rank_policy"], verify=group["verify"], inputs=inputs,
                            cache=self._factor_cache, comm=comm)
        deltas = [d for idx in self.blocks for d in res.updates[idx].tensors()]
        return {**res.report(), "alpha": alpha, "solver": group["solver"]}, deltas

    def _finish(self, report: dict, deltas: list[torch.Tensor]) -> None:
        """Warn about an inexact step (``rank_policy="warn"``), apply ``Δθ`` (rounded once to the
        parameter dtype) and record the report."""
        group = self.param_groups[0]
        if not report["exact"] and group["rank_policy"] == "warn":
            warnings.warn("ExactGN step is not exact Gauss-Newton: "
                          + "; ".join(f"block {b['block']}: rank(A_f)={b['rank_f']}, rank(A_g)="
                                      f"{b['rank_g']} of n={b['n']}"
                                      + ("" if b["accurate"] else
                                         f", relative residuals {b['residual_f']:.1e} / "
                                         f"{b['residual_g']:.1e} above "
                                         f"{report['residual_rtol']:.0e}")
                                      for b in report["blocks"]
                                      if not (b["full_rank"] and b["accurate"]))
                          + (" (damped solver)" if group["solver"] == "damped" else ""),
                          RuntimeWarning, stacklevel=caller_stacklevel())
        params = [p for idx in self.blocks for p in self.model.blocks[idx].parameters()]
        apply_update(self, zip(params, deltas, strict=True))
        self.last_step_exact = report["exact"]
        self.last_step_info = report
