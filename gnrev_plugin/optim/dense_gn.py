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
* ``"linear"``: structured, never materialising ``J``. For an ``nn.Linear`` layer with inputs
  ``a_i`` and output-VJPs ``g_{i,c} = ∂F_{ic}/∂z_i``, its block of the Gram is
  ``(a_iᵀa_j + 1)(g_{i,c}ᵀ g_{j,c'})``, i.e. ``Θ = (A Aᵀ + 1) ⊗ 1_{C×C} ⊙ (G Gᵀ)``. The ``G`` come
  from one batched backward over the ``C`` output coordinates; ``Δθ = Jᵀ Λ`` is one more backward.
  Needs every trained parameter to sit in an ``nn.Linear`` with 2-D inputs.
* ``"auto"`` (default): ``"linear"`` when possible, else ``"per_sample"``, else ``"rows"``.

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
from .errors import RankDeficiencyError
from .protocols import BATCH_STEP, DISTRIBUTED, GAUSS_NEWTON
from .solvers import GramSystem, SolverConfig
from .targets import mean_loss, newton_target
from .validation import validate_batch

__all__ = ["DenseGN", "find_module_owning", "JACOBIAN_METHODS"]

JACOBIAN_METHODS = ("auto", "linear", "per_sample", "rows")
_BATCH_COUPLING = (nn.modules.batchnorm._BatchNorm,)
class DenseGN(torch.optim.Optimizer):
    """Exact Gauss-Newton ``Δθ = −α Jᵀ(JJᵀ + λI)⁻¹ε`` for any module (module docstring).

    Args:
        params: parameters to update (others stay fixed); a single group.
        lr: ``α``; ``α = 1`` interpolates the batch to first order.
        model: the module (found from ``params`` if omitted).
        loss: ``"mse"`` or ``"cross_entropy"``.
        damping: ``λ`` (``> 0`` selects the damped solve; the step is then not exact).
        solver: ``"cholesky"`` or ``"eigh"`` for the ``nC×nC`` system (``rtol``/``atol``
            truncation as in :mod:`gnrev_plugin.optim.solvers`).
        ce_target, ce_damping: cross-entropy Newton target (see :class:`ExactGN`).
        jacobian: how ``J Jᵀ`` is formed (module docstring).
        weight_decay: decoupled, ``θ ← (1 − lr·wd)θ + Δθ``.
        rank_policy: ``"raise"`` or ``"warn"``.
        max_jacobian_entries: refuse to materialise a ``J`` larger than this.
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
        factor_dtype: torch.dtype = torch.float64,
        process_group=gdist.AUTO,
    ) -> None:
        validate_gn_options("DenseGN", lr, loss, ce_target)
        if jacobian not in JACOBIAN_METHODS:
            raise ValueError(f"unknown jacobian {jacobian!r}; choose from {JACOBIAN_METHODS}")
        if rank_policy not in ("raise", "warn"):
            raise ValueError(f"rank_policy must be 'raise' or 'warn', got {rank_policy!r}")
        if solver not in ("cholesky", "eigh"):
            raise ValueError(f"DenseGN solver must be 'cholesky' or 'eigh', got {solver!r}")
        method = "damped" if damping else solver
        factor_dtype = as_dtype(factor_dtype, "factor_dtype")
        SolverConfig(method, rtol, atol, damping, rank_rtol, factor_dtype=factor_dtype)
        defaults = dict(lr=lr, weight_decay=weight_decay, loss=loss, damping=damping,
                        solver=solver, rtol=rtol, atol=atol, rank_rtol=rank_rtol,
                        ce_target=ce_target, ce_damping=ce_damping, jacobian=jacobian,
                        rank_policy=rank_policy, factor_dtype=factor_dtype,
                        max_jacobian_entries=int(max_jacobian_entries))
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

    def _method(self, x: torch.Tensor) -> str:
        m = self.param_groups[0]["jacobian"]
        coupled = any(isinstance(mod, _BATCH_COUPLING) and mod.training
                      for mod in self.model.modules())
        linear_ok = x.dim() == 2 and all(self._linear_of(n) is not None for n in self.names)
        if m == "auto":
            return "linear" if (linear_ok and not coupled) else ("rows" if coupled
                                                                 else "per_sample")
        if m in ("linear", "per_sample") and coupled:
            raise ValueError(f"jacobian={m!r} assumes independent samples, but the model has "
                             "BatchNorm in training mode; use jacobian='rows'")
        if m == "linear" and not linear_ok:
            raise ValueError("jacobian='linear' needs every trained parameter in an nn.Linear "
                             "with 2-D inputs")
        return m

    def _linear_of(self, name: str) -> nn.Linear | None:
        mod_name, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        return mod if isinstance(mod, nn.Linear) and attr in ("weight", "bias") else None

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

    def _jacobian_dense(self, x: torch.Tensor, method: str, dtype: torch.dtype | None):
        """``F``, the rows of ``J`` as ``[J]`` (``nC × P``) and ``λ ↦ Jᵀλ``."""
        p = self._trained(dtype)
        f = self._forward_functional(x, dtype)
        with suspended(), _batch_statistics_only(self.model):
            out = f(p, x)
            P = sum(q.numel() for q in self.params)
            if out.numel() * P > self.max_jacobian_entries:
                raise ValueError(f"J would have {out.numel()}×{P} entries (> max_jacobian_entries="
                                 f"{self.max_jacobian_entries}); use a smaller batch or "
                                 "jacobian='linear'")
            if method == "rows":
                jac = jacrev(lambda q: f(q, x))(p)
            else:
                jac = vmap(jacrev(lambda q, xi: f(q, xi[None])[0]), in_dims=(None, 0))(p, x)
        J = torch.cat([jac[n].reshape(out.numel(), -1) for n in self.names], dim=1)
        return out, [J], lambda lam: gdist.unflatten(J.mT @ lam, self.params)

    def _jacobian_linear(self, x: torch.Tensor, dtype: torch.dtype | None):
        """``F``, each layer's ``[a, G]`` (inputs ``n×in``, output-VJPs ``G`` as ``n×C×out``)
        and ``λ ↦ Jᵀλ`` (one backward)."""
        layers: dict[str, nn.Linear] = {}
        for n in self.names:
            layers.setdefault(n.rpartition(".")[0], self._linear_of(n))
        records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [mod.register_forward_hook(
            lambda m, a, z, key=key: records.__setitem__(key, (a[0].detach(), z)))
            for key, mod in layers.items()]
        trained = {n: q.requires_grad_() for n, q in self._trained(dtype).items()}
        f = self._forward_functional(x, dtype)
        try:
            with torch.enable_grad(), suspended():
                out = f(trained, x)
        finally:
            for h in handles:
                h.remove()
        if out.dim() != 2:
            raise ValueError(f"DenseGN expects outputs of shape (n, C), got {tuple(out.shape)}")
        n, C = out.shape
        keys = list(layers)
        eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, n, C)
        with torch.enable_grad():
            grads = torch.autograd.grad(out, [records[k][1] for k in keys], grad_outputs=eye,
                                        is_grads_batched=True, retain_graph=True)
        parts = [t for key, G in zip(keys, grads, strict=True)
                 for t in (records[key][0], G.permute(1, 0, 2))]
        leaves = list(trained.values())

        def apply_jt(lam: torch.Tensor) -> list[torch.Tensor]:
            with torch.enable_grad():
                return list(torch.autograd.grad(out, leaves,
                                                grad_outputs=lam.reshape(n, C).to(out.dtype)))
        return out.detach(), parts, apply_jt

    def _linear_flags(self) -> list[tuple[bool, bool]]:
        """Per layer (in :meth:`_jacobian_linear`'s order): are its weight / bias trained?"""
        given, seen, flags = set(self.names), [], []
        for n in self.names:
            key = n.rpartition(".")[0]
            if key not in seen:
                seen.append(key)
                prefix = f"{key}." if key else ""
                flags.append((prefix + "weight" in given, prefix + "bias" in given))
        return flags

    def _gram(self, method: str, parts: list[torch.Tensor], n: int, C: int) -> torch.Tensor:
        """``J Jᵀ`` (``nC×nC``) from :meth:`_jacobian_dense`'s or :meth:`_jacobian_linear`'s
        parts (possibly gathered over ranks). Linear: ``Θ = Σ_ℓ (a aᵀ + 1) ⊗ 1_{C×C} ⊙ (G Gᵀ)``."""
        if method != "linear":
            J = parts[0].reshape(n * C, -1)
            return J @ J.mT
        ref = parts[0]
        K = torch.zeros(n * C, n * C, dtype=ref.dtype, device=ref.device)
        for j, (use_w, use_b) in enumerate(self._linear_flags()):
            a, G = parts[2 * j], parts[2 * j + 1]
            AA = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
            if use_w:
                AA = AA + a @ a.mT
            if use_b:
                AA = AA + 1.0
            Gt = G.reshape(n * C, -1)
            K += AA.repeat_interleave(C, 0).repeat_interleave(C, 1) * (Gt @ Gt.mT)
        return K

    def _local(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float):
        """The rank-local part of a step: ``(method, F, Gram parts, λ ↦ Jᵀλ, loss, ε)``."""
        group = self.param_groups[0]
        validate_batch(type(self).__name__, self.model, x, y, group["loss"])
        self._check_model()
        method = self._method(x)
        dtype = self._compute_dtype()
        if dtype is not None:
            x = x.to(dtype) if x.is_floating_point() else x
            y = y.to(dtype) if y.is_floating_point() else y
        if method == "linear":
            out, parts, apply_jt = self._jacobian_linear(x, dtype)
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

    def _solve(self, method: str, K: torch.Tensor, eps: torch.Tensor
               ) -> tuple[dict, torch.Tensor]:
        """``Λ = (J Jᵀ + λI)⁻¹ vec(−α ε)`` and the step report."""
        group = self.param_groups[0]
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
                "jacobian": method}, lam

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
        rows = [t.reshape(n_local, -1) if method != "linear" else t for t in parts]
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


class _batch_statistics_only:  # noqa: N801
    """BatchNorm layers in training mode use batch statistics without updating running ones
    (so the Jacobian pass neither mutates buffers inside ``torch.func`` nor double-counts)."""

    def __init__(self, model: nn.Module) -> None:
        self.mods = [m for m in model.modules() if isinstance(m, _BATCH_COUPLING) and m.training]

    def __enter__(self) -> None:
        self.saved = [(m.running_mean, m.running_var, m.track_running_stats) for m in self.mods]
        for m in self.mods:
            m.running_mean = m.running_var = None
            m.track_running_stats = False

    def __exit__(self, *exc) -> None:
        for m, (mean, var, track) in zip(self.mods, self.saved, strict=True):
            m.running_mean, m.running_var, m.track_running_stats = mean, var, track

