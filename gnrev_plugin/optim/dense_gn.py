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
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..nn.discovery import find_module_owning
from .capture import OutputCapture, suspended
from .common import apply_update, check_finite, validate_gn_options
from .errors import RankDeficiencyError
from .solvers import GramSystem, SolverConfig
from .targets import mean_loss, newton_target

__all__ = ["DenseGN", "find_module_owning", "JACOBIAN_METHODS"]

JACOBIAN_METHODS = ("auto", "linear", "per_sample", "rows")
_BATCH_COUPLING = (nn.modules.batchnorm._BatchNorm,)
#: Frames in these folders are this package's optimizers or torch (``torch.no_grad`` and
#: ``Optimizer.step`` wrappers); a warning skips them to point at the caller.
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by the function calling this: the first frame
    outside gnrev's optimizers and torch, i.e. the caller's ``opt.step()`` line, however many
    wrappers sit between (their number changes with the torch version)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


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
    """

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
    ) -> None:
        validate_gn_options("DenseGN", lr, loss, ce_target)
        if jacobian not in JACOBIAN_METHODS:
            raise ValueError(f"unknown jacobian {jacobian!r}; choose from {JACOBIAN_METHODS}")
        if rank_policy not in ("raise", "warn"):
            raise ValueError(f"rank_policy must be 'raise' or 'warn', got {rank_policy!r}")
        if solver not in ("cholesky", "eigh"):
            raise ValueError(f"DenseGN solver must be 'cholesky' or 'eigh', got {solver!r}")
        method = "damped" if damping else solver
        SolverConfig(method, rtol, atol, damping, rank_rtol)  # validates
        defaults = dict(lr=lr, weight_decay=weight_decay, loss=loss, damping=damping,
                        solver=solver, rtol=rtol, atol=atol, rank_rtol=rank_rtol,
                        ce_target=ce_target, ce_damping=ce_damping, jacobian=jacobian,
                        rank_policy=rank_policy)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DenseGN takes a single parameter group")
        self.params = list(self.param_groups[0]["params"])
        self.model = model if model is not None else find_module_owning(self.params)
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(self.model).__name__}")
        owned = {id(p): n for n, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in owned]
        if missing:
            raise ValueError(f"parameters {missing} passed to DenseGN are not in the model")
        self.names = [owned[id(p)] for p in self.params]
        self.max_jacobian_entries = int(max_jacobian_entries)
        self._capture = OutputCapture(self.model)
        self.last_step_exact: bool | None = None
        self.last_step_info: dict = {}

    # -- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drop-in step after ``loss.backward()`` (or with a torch.optim-style ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch, call = self._capture.consume(self.defaults["loss"])
        ls = float(call.options.get("label_smoothing", 0.0) or 0.0)
        self._step(batch.inputs, call.target, ls)
        return loss

    @torch.no_grad()
    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Explicit path on ``(x, y)``; returns the mean-reduced loss before the step."""
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

    def _forward_functional(self, x: torch.Tensor):
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        base.update({n: b for n, b in self.model.named_buffers()
                     if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))})

        def f(trained: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**base, **trained}, (inp,))
        return f

    def _gram_dense(self, x: torch.Tensor, method: str):
        p = {n: q.detach() for n, q in zip(self.names, self.params, strict=True)}
        f = self._forward_functional(x)
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
        return out, J @ J.mT, lambda lam: _split_flat(J.mT @ lam, self.params)

    def _gram_linear(self, x: torch.Tensor):
        layers: dict[str, nn.Linear] = {}
        for n in self.names:
            layers.setdefault(n.rpartition(".")[0], self._linear_of(n))
        records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [mod.register_forward_hook(
            lambda m, a, z, key=key: records.__setitem__(key, (a[0].detach(), z)))
            for key, mod in layers.items()]
        try:
            with torch.enable_grad(), suspended():
                out = self.model(x)
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
        given = set(self.names)
        K = torch.zeros(n * C, n * C, dtype=out.dtype, device=out.device)
        for key, G in zip(keys, grads, strict=True):
            a = records[key][0]
            prefix = f"{key}." if key else ""
            AA = torch.zeros(n, n, dtype=out.dtype, device=out.device)
            if prefix + "weight" in given:
                AA = AA + a @ a.mT
            if prefix + "bias" in given:
                AA = AA + 1.0
            Gt = G.permute(1, 0, 2).reshape(n * C, -1)
            K += AA.repeat_interleave(C, 0).repeat_interleave(C, 1) * (Gt @ Gt.mT)

        def apply_jt(lam: torch.Tensor) -> list[torch.Tensor]:
            with torch.enable_grad():
                return list(torch.autograd.grad(out, self.params,
                                                grad_outputs=lam.reshape(n, C).to(out.dtype)))
        return out.detach(), K, apply_jt

    def _step(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        group = self.param_groups[0]
        self._check_model()
        method = self._method(x)
        if method == "linear":
            out, K, apply_jt = self._gram_linear(x)
        else:
            out, K, apply_jt = self._gram_dense(x, method)
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
        config = SolverConfig("damped" if group["damping"] else group["solver"], group["rtol"],
                              group["atol"], group["damping"], group["rank_rtol"])
        system = GramSystem(K, config, out.dtype)
        if not system.full_rank and group["rank_policy"] == "raise":
            raise RankDeficiencyError(
                f"J Jᵀ has rank {system.rank} < nC = {system.n} (more outputs than parameters, or "
                "duplicated samples), so J Δθ = −α ε has no exact solution; use a smaller batch "
                "or rank_policy='warn' for the least-squares step")
        target = (-group["lr"] * eps).reshape(-1)
        lam = system.solve(target[:, None])[:, 0]
        deltas = apply_jt(lam.to(out.dtype))
        if not system.exact and group["rank_policy"] == "warn":
            warnings.warn(f"DenseGN step is not exact Gauss-Newton (rank {system.rank} of "
                          f"{system.n}, damping {group['damping']})", RuntimeWarning,
                          stacklevel=_caller_stacklevel())
        apply_update(self, zip(self.params, deltas, strict=True))
        self.last_step_exact = system.exact
        self.last_step_info = {"exact": system.exact, "rank": system.rank, "n_outputs": system.n,
                               "jacobian": method}
        return loss


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


def _split_flat(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(v[i:i + p.numel()].reshape(p.shape))
        i += p.numel()
    return out
