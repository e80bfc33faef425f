"""DenseGN: model-agnostic exact Gauss-Newton for any ``nn.Module`` (small and medium models).

With the stacked Jacobian ``J = ∂vec F/∂θ ∈ R^{nC×P}`` (rows sample-major) and Newton target
``ε = H⁻¹g`` (:mod:`gnrev_plugin.optim.targets`), one step is

    Δθ = −α Jᵀ (J Jᵀ + λI)⁻¹ vec ε,

the minimum-norm (Moore-Penrose) Gauss-Newton step for ``λ = 0`` and full-row-rank ``J``: the
linearised output change is ``J Δθ = −α ε``. It works in output space: an ``nC×nC`` Gram, so it
fits over-parameterised models (``P ≥ nC``). It is also the oracle :class:`ExactGN` is tested
against.

How ``J Jᵀ`` is formed (``jacobian=``):

* ``"rows"``: ``torch.func.jacrev`` (``vmap`` over the ``nC`` output rows); any module.
* ``"per_sample"``: ``vmap`` over samples of the single-sample Jacobian; needs a model whose
  samples do not interact (no BatchNorm in training mode).
* ``"structured"`` (``"linear"`` is its former name): per layer, never materialising that
  layer's ``J``. ``nn.Linear``, ``nn.Conv2d`` and the affine parameters of LayerNorm / GroupNorm /
  BatchNorm (eval mode) give their Gram from layer inputs ``a`` and output-VJPs
  ``g_{i,c} = ∂F_{ic}/∂z_i`` (:mod:`gnrev_plugin.optim.gram`; e.g. ``(A Aᵀ + 1) ⊗ 1_{C×C} ⊙ (G Gᵀ)``
  for a Linear layer), each by the cheaper of per-sample gradients and the patch Gram, chunked
  under ``max_memory_mb``; the ``G`` come from one batched backward over the ``C`` output
  coordinates. The remaining trained parameters take the ``"per_sample"`` Jacobian.
  ``Δθ = Jᵀ Λ`` is one more backward. ``last_step_info["layers"]`` says what each layer used.
* ``"auto"`` (default): ``"structured"`` unless a BatchNorm layer is in training mode: it couples
  the samples, so ``J`` is the batch Jacobian (``"rows"``; ``last_step_info["note"]`` says so).

**Matrix-free** (``solver="cg"``, any module): preconditioned conjugate gradients on ``(J Jᵀ + λI)
Λ = −α vec ε`` with one JVP and one VJP per iteration (:mod:`gnrev_plugin.optim.cg`), memory ``O(P
+ nC)``, preconditioned by the exact per-sample ``C×C`` blocks (or the diagonal) of ``J Jᵀ`` when
every trained parameter is in a structured layer (else none). ``last_step_exact`` is true only when
the true residual ``‖J Δθ + α ε‖ / ‖α ε‖``, recomputed with a separate JVP, is at most ``cg_tol``
(and ``λ = 0``); ``last_step_info`` has the iterations and that residual. A step that misses it
raises :class:`~gnrev_plugin.optim.errors.RankDeficiencyError` (``rank_policy="raise"``) or is
taken with a warning (``"warn"``).

Rank handling follows :class:`ExactGN`: ``rank_policy="raise"`` raises
:class:`~gnrev_plugin.optim.errors.RankDeficiencyError` when ``J Jᵀ`` is rank-deficient (``nC > P``,
duplicated samples...), ``"warn"`` takes the least-squares step ``J⁺`` and warns.

**Distributed** (``process_group``, default ``"auto"``: WORLD when ``torch.distributed`` is
initialised): the batch is the union of the ranks' local batches. Rank ``r`` gathers its rows of
``J`` (``jacobian="linear"``: each layer's inputs ``a`` and output-VJPs ``G``) on rank 0, which
forms and factors the global ``J Jᵀ`` and broadcasts ``Λ = (J Jᵀ + λI)⁻¹ vec(−α ε)``; then
``Δθ = Σ_r J_rᵀ Λ_r`` is one all-reduce (:mod:`gnrev_plugin.optim.distributed`).

**Low-precision parameters** (bfloat16/float16): the Jacobian, the Gram and its solve are
computed in ``factor_dtype`` (float64 by default, float32 for devices without fast float64) at
the exactly converted parameters, and ``θ + Δθ`` is rounded once to the parameter dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..nn.discovery import find_module_owning
from . import distributed as gdist
from .capture import OutputCapture, autocast_disabled, suspended
from .common import (
    apply_update,
    as_dtype,
    caller_stacklevel,
    check_finite,
    is_low_precision,
    validate_gn_options,
)
from .dense_gn_cg import BATCH_COUPLING, BatchStatisticsOnly, step_cg
from .errors import RankDeficiencyError
from .gram import LayerFactors, factored_gram
from .gram.capture import capture_factors, plan_layers
from .protocols import BATCH_STEP, DISTRIBUTED, GAUSS_NEWTON
from .solvers import GramSystem, SolverConfig
from .targets import mean_loss, newton_target
from .validation import validate_batch

__all__ = ["DenseGN", "find_module_owning", "JACOBIAN_METHODS"]

JACOBIAN_METHODS = ("auto", "structured", "linear", "per_sample", "rows")
SOLVERS = ("cholesky", "eigh", "cg")
CG_PRECONDITIONERS = ("block", "diagonal", "none")
_COUPLED_NOTE = ("BatchNorm in training mode couples the samples: J is the batch Jacobian "
                 "(jacobian='rows')")


class DenseGN(torch.optim.Optimizer):
    """Exact Gauss-Newton ``Δθ = −α Jᵀ(JJᵀ + λI)⁻¹ε`` for any module (module docstring).

    Args:
        params: parameters to update (others stay fixed); a single group.
        lr: ``α``; ``α = 1`` interpolates the batch to first order.
        model: the module (found from ``params`` if omitted).
        loss: ``"mse"`` or ``"cross_entropy"``.
        damping: ``λ`` (``> 0`` selects the damped solve; the step is then not exact).
        solver: ``"cholesky"`` or ``"eigh"`` for the ``nC×nC`` system (``rtol``/``atol``
            truncation as in :mod:`gnrev_plugin.optim.solvers`), or ``"cg"`` (matrix-free,
            module docstring).
        ce_target, ce_damping: cross-entropy Newton target (see :class:`ExactGN`).
        jacobian: how ``J Jᵀ`` is formed (module docstring).
        weight_decay: decoupled, ``θ ← (1 − lr·wd)θ + Δθ``.
        rank_policy: ``"raise"`` or ``"warn"``.
        max_jacobian_entries: refuse to materialise a ``J`` larger than this.
        max_memory_mb: memory bound for the structured Grams' per-sample gradients.
        cg_tol, cg_max_iter: ``solver="cg"``: relative true-residual tolerance and iteration
            limit.
        cg_preconditioner: ``"block"`` (the exact per-sample ``C×C`` blocks of ``J Jᵀ``),
            ``"diagonal"`` (its exact diagonal) or ``"none"``; both exact ones need every trained
            parameter in a structured layer and independent samples, else none is used.
        factor_dtype: dtype ``J Jᵀ`` is factored and solved in (default float64; or its name,
            e.g. ``"float32"``); with
            bfloat16/float16 parameters the Jacobian and the Gram are computed in it too
            (module docstring); float32 for devices without fast float64.
        process_group: ``"auto"``, ``None`` or a process group (see :class:`ExactGN` and
            :mod:`gnrev_plugin.optim.distributed`).
    """

    capabilities = frozenset({GAUSS_NEWTON, BATCH_STEP, DISTRIBUTED})

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1.0,
        *,
        model: nn.Module | None = None,
        loss: str = "mse",
        damping: float = 0.0,
        solver: str = "cholesky",
        rtol: float = 0.0,
        atol: float = 0.0,
        rank_rtol: float | None = None,
        ce_target: str = "identity",
        ce_damping: float = 1e-3,
        jacobian: str = "auto",
        weight_decay: float = 0.0,
        rank_policy: str = "raise",
        max_jacobian_entries: int = 200_000_000,
        max_memory_mb: float = 1024.0,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 500,
        cg_preconditioner: str = "block",
        factor_dtype: torch.dtype = torch.float64,
        process_group=gdist.AUTO,
    ) -> None:
        validate_gn_options("DenseGN", lr, loss, ce_target)
        if jacobian not in JACOBIAN_METHODS:
            raise ValueError(f"unknown jacobian {jacobian!r}; choose from {JACOBIAN_METHODS}")
        if rank_policy not in ("raise", "warn"):
            raise ValueError(f"rank_policy must be 'raise' or 'warn', got {rank_policy!r}")
        if solver not in SOLVERS:
            raise ValueError(f"DenseGN solver must be one of {SOLVERS}, got {solver!r}")
        if max_memory_mb <= 0 or cg_tol <= 0 or int(cg_max_iter) < 1:
            raise ValueError("max_memory_mb and cg_tol must be > 0 and cg_max_iter ≥ 1")
        if cg_preconditioner not in CG_PRECONDITIONERS:
            raise ValueError(f"cg_preconditioner must be one of {CG_PRECONDITIONERS}, got "
                             f"{cg_preconditioner!r}")
        method = "damped" if damping else ("cholesky" if solver == "cg" else solver)
        factor_dtype = as_dtype(factor_dtype, "factor_dtype")
        SolverConfig(method, rtol, atol, damping, rank_rtol, factor_dtype=factor_dtype)
        defaults = dict(lr=lr, weight_decay=weight_decay, loss=loss, damping=damping,
                        solver=solver, rtol=rtol, atol=atol, rank_rtol=rank_rtol,
                        ce_target=ce_target, ce_damping=ce_damping, jacobian=jacobian,
                        rank_policy=rank_policy, factor_dtype=factor_dtype,
                        max_jacobian_entries=int(max_jacobian_entries),
                        max_memory_mb=max_memory_mb, cg_tol=cg_tol, cg_max_iter=int(cg_max_iter),
                        cg_preconditioner=cg_preconditioner)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DenseGN takes a single parameter group")
        self.params = list(self.param_groups[0]["params"])
        self.model = gdist.unwrap_model(model if model is not None
                                        else find_module_owning(self.params))
        self.process_group = process_group
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(self.model).__name__}")
        owned = {id(p): n for n, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in owned]
        if missing:
            raise ValueError(f"parameters {missing} passed to DenseGN are not in the model")
        self.names = [owned[id(p)] for p in self.params]
        self._capture = OutputCapture(self.model)
        self.last_step_exact: bool | None = None
        self.last_step_info: dict = {}

    @property
    def max_jacobian_entries(self) -> int:
        """The largest ``J`` materialised (the param group's ``max_jacobian_entries``)."""
        return self.param_groups[0]["max_jacobian_entries"]

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:      # state dicts saved before an option existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drop-in step after ``loss.backward()`` (or with a torch.optim-style ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with autocast_disabled(self.model):     # an opt.step() inside torch.autocast
            batch, call = self._capture.consume(self.defaults["loss"])
            ls = float(call.options.get("label_smoothing", 0.0) or 0.0)
            self._step(batch.inputs, call.target, ls)
        return loss

    @torch.no_grad()
    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Explicit path on ``(x, y)``; returns the mean-reduced loss before the step."""
        with autocast_disabled(self.model):
            return self._step(x, y, 0.0)

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model."""
        self._capture.close()

    # -- internals --------------------------------------------------------------------------
    def _check_model(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError("the Gauss-Newton step needs a deterministic forward pass: "
                                 "put the model in eval() mode or remove dropout")

    def _coupled(self) -> bool:
        return any(isinstance(mod, BATCH_COUPLING) and mod.training
                   for mod in self.model.modules())

    def _method(self) -> str:
        """The Jacobian method of this step (``"structured"``, ``"per_sample"`` or ``"rows"``)."""
        m = self.param_groups[0]["jacobian"]
        coupled = self._coupled()
        if m == "auto":
            return "rows" if coupled else "structured"
        if m in ("structured", "linear", "per_sample") and coupled:
            raise ValueError(f"jacobian={m!r} assumes independent samples, but the model has "
                             "BatchNorm in training mode; use jacobian='rows' or solver='cg'")
        return "structured" if m == "linear" else m

    def _compute_dtype(self) -> torch.dtype | None:
        """``factor_dtype`` when the trained parameters are bfloat16/float16, else ``None`` (the
        parameters' own dtype)."""
        low = is_low_precision(self.params[0].dtype)
        return self.param_groups[0]["factor_dtype"] if low else None

    def _base(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The model's parameters (detached) and buffers (not BatchNorm statistics), cast to
        ``dtype`` if given."""
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        base.update({n: b for n, b in self.model.named_buffers()
                     if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))})
        if dtype is not None:
            base = {n: t.to(dtype) if t.is_floating_point() else t for n, t in base.items()}
        return base

    def _trained(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {n: q.detach() if dtype is None else q.detach().to(dtype)
                for n, q in zip(self.names, self.params, strict=True)}

    def _forward_functional(self, x: torch.Tensor, dtype: torch.dtype | None = None):
        base = self._base(dtype)

        def f(trained: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**base, **trained}, (inp,))
        return f

    def _jacobian_dense(self, x: torch.Tensor, method: str, dtype: torch.dtype | None,
                        names: list[str] | None = None):
        """``F``, the rows of ``J`` (for parameters ``names``, default all trained) as ``[J]``
        (``nC × P``) and ``λ ↦ Jᵀλ``."""
        names = self.names if names is None else names
        p = {k: v for k, v in self._trained(dtype).items() if k in names}
        f = self._forward_functional(x, dtype)
        with suspended(), BatchStatisticsOnly(self.model):
            out = f(p, x)
            P = sum(q.numel() for q in p.values())
            if out.numel() * P > self.max_jacobian_entries:
                hint = (_COUPLED_NOTE + "; use solver='cg', eval() mode or a smaller batch"
                        if method == "rows" and self._coupled() else "use a smaller batch")
                raise ValueError(f"J would have {out.numel()}×{P} entries (> max_jacobian_entries="
                                 f"{self.max_jacobian_entries}); {hint}")
            if method == "rows":
                jac = jacrev(lambda q: f(q, x))(p)
            else:
                jac = vmap(jacrev(lambda q, xi: f(q, xi[None])[0]), in_dims=(None, 0))(p, x)
        J = torch.cat([jac[k].reshape(out.numel(), -1) for k in names], dim=1)
        return out, [J], lambda lam: gdist.unflatten(J.mT @ lam, self.params)

    def _jacobian_structured(self, x: torch.Tensor, dtype: torch.dtype | None):
        """``F``, the Gram parts (each structured layer's ``a``, ``g``; then the generic
        parameters' per-sample ``J`` rows as ``n × C·P_rest``) and ``λ ↦ Jᵀλ``."""
        self._layers, self._generic = plan_layers(self.model, self.names)
        f = self._forward_functional(x, dtype)
        with suspended():
            out, factors, apply_jt = capture_factors(f, self._trained(dtype), x, self._layers)
        parts = [t for fa in factors for t in (fa.a, fa.g)]
        if self._generic:
            J = self._jacobian_dense(x, "per_sample", dtype, self._generic)[1][0]
            parts.append(J.reshape(out.shape[0], -1))
        return out, parts, apply_jt

    def _gram(self, method: str, parts: list[torch.Tensor], n: int, C: int
              ) -> tuple[torch.Tensor, dict[str, str]]:
        """``J Jᵀ`` (``nC×nC``) from :meth:`_jacobian_dense`'s or :meth:`_jacobian_structured`'s
        parts (possibly gathered over ranks), and the strategy of each structured layer."""
        if method != "structured":
            J = parts[0].reshape(n * C, -1)
            return J @ J.mT, {}
        budget = self.param_groups[0]["max_memory_mb"]
        K = parts[0].new_zeros(n * C, n * C)
        used = {}
        for k, layer in enumerate(self._layers):
            Kl, strategy = factored_gram(LayerFactors(parts[2 * k], parts[2 * k + 1]),
                                         max_memory_mb=budget)
            K += Kl
            used[layer.name or "<model>"] = f"{layer.kind}:{strategy}"
        if self._generic:
            J = parts[-1].reshape(n * C, -1)
            K += J @ J.mT
            used.update(dict.fromkeys(self._generic, "generic:per_sample"))
        return K, used

    def _local(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float):
        """The rank-local part of a step: ``(method, F, Gram parts, λ ↦ Jᵀλ, loss, ε)``."""
        group = self.param_groups[0]
        validate_batch(type(self).__name__, self.model, x, y, group["loss"])
        self._check_model()
        method = self._method()
        dtype = self._compute_dtype()
        if dtype is not None:
            x = x.to(dtype) if x.is_floating_point() else x
            y = y.to(dtype) if y.is_floating_point() else y
        if method == "structured":
            out, parts, apply_jt = self._jacobian_structured(x, dtype)
        else:
            out, parts, apply_jt = self._jacobian_dense(x, method, dtype)
        if out.dim() != 2:
            raise ValueError(f"DenseGN expects outputs of shape (n, C), got {tuple(out.shape)}")
        out = out.detach()
        loss = mean_loss(group["loss"], out, y)
        check_finite("model output", out)
        check_finite("loss", loss)
        if y.is_floating_point():
            check_finite("targets", y)
        eps = newton_target(group["loss"], out, y, ce_target=group["ce_target"],
                            ce_damping=group["ce_damping"], label_smoothing=label_smoothing)
        return method, out, parts, apply_jt, loss, eps

    def _solve(self, method: str, gram: tuple[torch.Tensor, dict], eps: torch.Tensor
               ) -> tuple[dict, torch.Tensor]:
        """``Λ = (J Jᵀ + λI)⁻¹ vec(−α ε)`` and the step report."""
        group = self.param_groups[0]
        K, layers = gram
        config = SolverConfig("damped" if group["damping"] else group["solver"], group["rtol"],
                              group["atol"], group["damping"], group["rank_rtol"],
                              factor_dtype=group["factor_dtype"])
        system = GramSystem(K, config, K.dtype)
        if not system.full_rank and group["rank_policy"] == "raise":
            raise RankDeficiencyError(
                f"J Jᵀ has rank {system.rank} < nC = {system.n} (more outputs than parameters, or "
                "duplicated samples), so J Δθ = −α ε has no exact solution; use a smaller batch "
                "or rank_policy='warn' for the least-squares step")
        target = (-group["lr"] * eps).reshape(-1)
        lam = system.solve(target[:, None])[:, 0]
        return {"exact": system.exact, "rank": system.rank, "n_outputs": system.n,
                "jacobian": method, "layers": layers, **self._note()}, lam

    def _note(self) -> dict:
        return {"note": _COUPLED_NOTE} if self._coupled() else {}

    def _finish(self, report: dict, deltas: list[torch.Tensor]) -> None:
        group = self.param_groups[0]
        if not report["exact"] and group["rank_policy"] == "warn":
            warnings.warn(f"DenseGN step is not exact Gauss-Newton (rank {report['rank']} of "
                          f"{report['n_outputs']}, damping {group['damping']})", RuntimeWarning,
                          stacklevel=caller_stacklevel())
        apply_update(self, zip(self.params, deltas, strict=True))
        self.last_step_exact = report["exact"]
        self.last_step_info = report

    def _comm(self) -> gdist.Comm | None:
        group = gdist.resolve_group(self.process_group)
        return None if group is None else gdist.Comm(group, self.params[0].device)

    def _step(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        comm = self._comm()
        if self.param_groups[0]["solver"] == "cg":
            if comm is not None:
                raise NotImplementedError("DenseGN solver='cg' runs in one process; use "
                                          "process_group=None or solver='cholesky'")
            return self._step_cg(x, y, label_smoothing)
        if comm is None:
            method, out, parts, apply_jt, loss, eps = self._local(x, y, label_smoothing)
            n, C = out.shape
            report, lam = self._solve(method, self._gram(method, parts, n, C), eps)
            self._finish(report, apply_jt(lam.to(out.dtype)))
            return loss
        err = local = None
        try:
            local = self._local(x, y, label_smoothing)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by agree()
            err = e
        n_local = 0 if local is None else local[1].shape[0]
        total, n = comm.agree(err, 0.0 if local is None else float(local[4]) * n_local, n_local)
        method, out, parts, apply_jt, loss, eps = local
        C = out.shape[1]
        rows = [t.reshape(n_local, -1) if method != "structured" else t for t in parts]
        got = comm.gather_rows([*rows, eps])
        outcome = lam = None
        if comm.is_root:
            try:
                outcome, lam = self._solve(method, self._gram(method, got[:-1], n, C), got[-1])
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                outcome = e
        report, lam = comm.broadcast_result(outcome, lam)
        lo = comm.offset() * C
        deltas = apply_jt(lam[lo:lo + n_local * C].to(out.dtype))
        flat = comm.all_reduce_sum(gdist.flatten(deltas))
        self._finish(report, gdist.unflatten(flat, deltas))
        return torch.as_tensor(total / n, dtype=loss.dtype, device=loss.device)

    def _step_cg(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """Matrix-free step: :func:`gnrev_plugin.optim.dense_gn_cg.step_cg`."""
        return step_cg(self, x, y, label_smoothing)
