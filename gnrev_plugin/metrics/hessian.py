r"""Hessian = Gauss-Newton + NME, on curvlinops 3.0.1 operators.

For an empirical risk ``L(θ) = c Σ_n ℓ(z_n(θ), y_n)`` (``c = 1/N`` for ``reduction='mean'``, ``c = 1``
for ``'sum'``; curvlinops differentiates the ``loss_fn`` exactly as given) with logits
``z_n = f(θ, x_n) ∈ R^C``, per-sample Jacobians ``J_n = ∂z_n/∂θ`` and ``H_{z,n} = ∇²_z ℓ_n``:

    H   = ∇²_θ L = G + NME
    G   = c Σ_n J_nᵀ H_{z,n} J_n                       (Gauss-Newton / GGN, PSD)
    NME = c Σ_n Σ_k [∇_z ℓ_n]_k ∇²_θ z_{n,k}          (nonlinear modelling error, indefinite)

(Dauphin, Agarwala & Mobahi 2024; the NME is Singh et al.'s "functional Hessian" ``H_F``.) The NME is
also the Hessian of the stop-gradient surrogate

    s(θ) = c Σ_n ⟨ stopgrad(∇_z ℓ_n), z_n(θ) ⟩

which needs one double-backward per product (:class:`SurrogateNMELinearOperator`).

:func:`decompose` returns the three operators (``H`` and ``G`` are curvlinops'
``HessianLinearOperator``/``GGNLinearOperator``, ``NME = H − G`` is their lazy difference) and a
:meth:`HessianDecomposition.summary` with traces, top eigenvalues, ``λ_min(H)``, Frobenius norms,
ratios, per-block shares, the within- vs cross-layer split of the NME and optional spectral
densities, all computed with curvlinops' estimators (Hutchinson, Hutch++, XTrace,
``hutchinson_squared_fro``, Papyan's Lanczos densities) and scipy's ``eigsh`` on ``op.to_scipy()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    SubmatrixLinearOperator,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_approximate_spectrum,
    xtrace,
)
from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from ._params import as_batches, flat_indices, group_by_module, param_names, select_params

__all__ = ["decompose", "HessianDecomposition", "SurrogateNMELinearOperator", "nme_surrogate_dense",
           "dense_matrix", "TRACE_ESTIMATORS", "estimate_trace", "assert_not_backpack_extended"]

#: curvlinops trace estimators by name, with the divisor their matvec budget must respect.
TRACE_ESTIMATORS: dict[str, tuple[Callable, int]] = {
    "hutchinson": (hutchinson_trace, 1),
    "hutchpp": (hutchpp_trace, 3),
    "xtrace": (xtrace, 2),
}


def estimate_trace(op: PyTorchLinearOperator, estimator: str = "hutchpp", num_matvecs: int = 90,
                   seed: int | None = None) -> tuple[float, int]:
    """``tr(op)`` by a curvlinops estimator; returns ``(estimate, matvecs used)``.

    ``num_matvecs`` is rounded down to the estimator's divisor (Hutch++: 3, XTrace: 2) and kept
    below the dimension, as curvlinops requires. ``seed`` seeds torch's global RNG first.
    """
    if estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"trace estimator must be one of {sorted(TRACE_ESTIMATORS)}")
    fn, div = TRACE_ESTIMATORS[estimator]
    dim = op.shape[0]
    if dim < div + 1:
        raise ValueError(f"operator of size {dim} is too small for {estimator}; use exact traces")
    nmv = max(div, (min(num_matvecs, dim - 1) // div) * div)
    if seed is not None:
        torch.manual_seed(seed)
    return fn(op, nmv).item(), nmv


def assert_not_backpack_extended(*modules: nn.Module) -> None:
    """Raise if a module carries ``backpack.extend``'s hooks (they break ``torch.func`` transforms).

    Detection looks at the installed hooks, not BackPACK's ``_backpack_extend`` flag (which
    modules may also set to opt out of extension).
    """
    def hooked(m: nn.Module) -> bool:
        hooks = [*m._forward_hooks.values(), *m._backward_hooks.values()]
        return any(getattr(h, "__module__", "").startswith("backpack") for h in hooks)

    for mod in modules:
        if isinstance(mod, nn.Module) and any(hooked(m) for m in mod.modules()):
            raise ValueError(
                f"{type(mod).__name__} was extended by BackPACK; its hooks break curvlinops' "
                "torch.func transforms. Pass a non-extended copy (new module + load_state_dict).")


def _reduction_factor(loss_fn: nn.Module) -> str:
    red = getattr(loss_fn, "reduction", None)
    if red not in ("mean", "sum"):
        raise ValueError("loss_fn must be an nn.Module loss with reduction 'mean' or 'sum' "
                         f"(curvlinops renormalises batches by it); got reduction={red!r}")
    return red


class SurrogateNMELinearOperator(CurvatureLinearOperator):
    r"""The NME as the Hessian of ``s(θ) = c Σ_n ⟨stopgrad(∇_z ℓ_n), z_n(θ)⟩``.

    Each product is one forward-over-reverse pass (``jvp`` of ``grad s``) per batch; batches are
    weighted like curvlinops' own operators (``N_B/N`` for mean reduction), so it equals
    ``HessianLinearOperator − GGNLinearOperator`` for the same arguments.
    """

    SELF_ADJOINT: bool = True

    @cached_property
    def _mp(self):
        model, loss_fn, params = self._model_func, self._loss_func, tuple(self._params)
        names = param_names(model, params)

        def f(ps, X):
            return functional_call(model, dict(zip(names, ps, strict=True)), (X,))

        @torch.no_grad()
        def nme_vp(X, y, *v):
            z0 = f(params, X)
            g = grad(lambda z: loss_fn(z, y))(z0)            # ∇_z ℓ with the loss's own scaling

            def s(*ps):
                return (g * f(ps, X)).sum()

            _, out = jvp(jacrev(s, argnums=tuple(range(len(params)))), params, tuple(v))
            return out

        dims = tuple(p.ndim for p in params)
        return vmap(nme_vp, in_dims=(None, None, *dims), out_dims=dims, randomness="same")

    def _matmat_batch(self, X, y, M):
        return list(self._mp(X, y, *M))


def nme_surrogate_dense(model: nn.Module, loss_fn: nn.Module, data,
                        params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Dense NME ``(P, P)`` as ``torch.func.hessian`` of the stop-gradient surrogate ``s(θ)``.

    Batches are weighted by ``N_B/N`` (mean reduction) or 1 (sum), as in curvlinops.
    """
    params = select_params(model, params)
    names = param_names(model, params)
    batches = as_batches(data)
    red = _reduction_factor(loss_fn)
    n_total = sum(X.shape[0] for X, _ in batches)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(v):
        return {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}

    out = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    for X, y in batches:
        z0 = model(X).detach().requires_grad_(True)
        g = torch.autograd.grad(loss_fn(z0, y), z0)[0].detach()
        w = X.shape[0] / n_total if red == "mean" else 1.0

        def s(v, X=X, g=g):
            return (g * functional_call(model, unflatten(v), (X,))).sum()

        out += w * hessian(s)(flat)
    return out


def dense_matrix(op: PyTorchLinearOperator) -> torch.Tensor:
    """``op @ I``: the dense matrix of a curvlinops operator (``P`` matvecs)."""
    return op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)


class _CountingScipy(LinearOperator):
    """Wrap a scipy LinearOperator and count matrix-vector products (columns)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op, self.count = op, 0

    def _matvec(self, x):
        self.count += 1
        return self.op.matvec(x)

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.op.matmat(X)

    def _adjoint(self):
        return self


def _eigsh(op: PyTorchLinearOperator, k: int, which: str, tol: float, maxiter: int | None
           ) -> tuple[list[float], int, bool]:
    """Extreme eigenvalues by ARPACK Lanczos on ``op.to_scipy()``: (values, matvecs, converged)."""
    sop = _CountingScipy(op.to_scipy(dtype=np.float64))
    try:
        vals = eigsh(sop, k=k, which=which, tol=tol, maxiter=maxiter, return_eigenvectors=False)
        ok = True
    except ArpackNoConvergence as err:
        vals, ok = err.eigenvalues, False
    vals = sorted((float(v) for v in vals), reverse=(which == "LA"))
    return vals, sop.count, ok


@dataclass
class HessianDecomposition:
    """``H = G + NME`` as curvlinops operators, with a :meth:`summary`.

    Attributes:
        hessian: ``H`` (``HessianLinearOperator``).
        ggn: ``G`` (``GGNLinearOperator``).
        nme: ``H − G`` (lazy ``_SumPyTorchLinearOperator``).
        nme_surrogate: the NME as the surrogate Hessian (:class:`SurrogateNMELinearOperator`).
        params, names: the parameters (in operator order) and their names.
        blocks: block name → parameter indices (default: one block per module, i.e. per layer;
            for a RevMLP, per half-layer ``blocks.l.f`` / ``blocks.l.g``).
    """

    hessian: PyTorchLinearOperator
    ggn: PyTorchLinearOperator
    nme: PyTorchLinearOperator
    nme_surrogate: PyTorchLinearOperator
    params: list[torch.Tensor]
    names: list[str]
    blocks: dict[str, list[int]]
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_params(self) -> int:
        return self.hessian.shape[0]

    def dense(self, which: str) -> torch.Tensor:
        """Dense ``"hessian"``, ``"ggn"``, ``"nme"`` (= H − G) or ``"nme_surrogate"`` (cached)."""
        if which not in self._dense:
            if which == "nme":
                self._dense[which] = self.dense("hessian") - self.dense("ggn")
            else:
                self._dense[which] = dense_matrix(getattr(self, which))
        return self._dense[which]

    def block_indices(self, name: str) -> list[int]:
        """Flat parameter-vector indices of block ``name``."""
        return flat_indices(self.params, self.blocks[name])

    # ------------------------------------------------------------------ summary
    def summary(
        self,
        top_k: int = 5,
        exact_max_dim: int = 1500,
        trace_estimator: str = "hutchpp",
        num_matvecs: int = 90,
        per_block: bool = True,
        block_num_matvecs: int = 30,
        spectral_density: bool = False,
        density_ncv: int = 64,
        eigsh_tol: float = 1e-6,
        eigsh_maxiter: int | None = None,
        lambda_min: bool = True,
        frobenius: bool = True,
        nme_operator: str = "difference",
        seed: int = 0,
    ) -> dict:
        r"""Traces, top-k eigenvalues, ``λ_min(H)``, Frobenius norms, ratios and block shares.

        With ``P ≤ exact_max_dim`` everything is exact (dense ``op @ I``, ``P`` matvecs per
        operator, ``torch.linalg.eigvalsh``). Otherwise:

        * traces by ``trace_estimator`` ∈ {hutchinson, hutchpp, xtrace} with ``num_matvecs``
          (rounded down to the estimator's divisor and below ``P``), seeded with ``seed``;
        * top-k eigenvalues (and ``λ_min(H)``) by ARPACK Lanczos (``eigsh`` on ``to_scipy()``);
          the matvec counts and convergence flags are recorded;
        * ``‖A‖_F² = tr(AᵀA)`` by ``hutchinson_squared_fro``;
        * per block ``b``: ``tr(A_bb)`` and ``‖NME_bb‖_F²`` on ``SubmatrixLinearOperator``
          (exact when the block has ``≤ block_num_matvecs`` coordinates, else Hutchinson with
          ``block_num_matvecs`` probes, which is robust to the exactly-zero blocks of ReLU nets).

        Returned keys: ``num_params``, ``mode``, ``trace`` (``{op: {value, estimator,
        num_matvecs}}``), ``top_eigenvalues``, ``eigs_info``, ``lambda_min_hessian``,
        ``frobenius``, ``ratios`` (``nme_fro/hessian_fro``, ``nme_trace/hessian_trace``,
        ``lambda_min/lambda_max`` of ``H``), ``blocks`` (per block traces and shares
        ``tr(A_bb)/tr(A)``, ``nme_within_fro``), ``nme_split`` (``within = Σ_b ‖NME_bb‖_F²``,
        ``cross = ‖NME‖_F² − within``, ``within_share``), ``surrogate_check`` (max abs difference
        of ``NME_surrogate v`` and ``(H − G) v`` on probe vectors, relative to ``‖(H−G)v‖``), and
        ``spectral_density`` (``{op: (grid, density)}``, Papyan's Lanczos) when requested.

        In estimated mode ``frobenius=False`` skips the Frobenius estimates (``nan``), and
        ``nme_operator="surrogate"`` runs the NME estimators on the surrogate Hessian (one
        double-backward per product) instead of ``H − G`` (two passes); both are exact operators
        for the same matrix, cross-checked in ``surrogate_check``.
        """
        if trace_estimator not in TRACE_ESTIMATORS:
            raise ValueError(f"trace_estimator must be one of {sorted(TRACE_ESTIMATORS)}")
        if nme_operator not in ("difference", "surrogate"):
            raise ValueError("nme_operator must be 'difference' (H − G) or 'surrogate'")
        P = self.num_params
        nme_op = self.nme if nme_operator == "difference" else self.nme_surrogate
        nme_cost = 2 if nme_operator == "difference" else 1
        ops = {"hessian": self.hessian, "ggn": self.ggn, "nme": nme_op}
        out: dict = {"num_params": P}
        exact = P <= exact_max_dim
        out["mode"] = "exact" if exact else "estimated"
        gen = torch.Generator(device="cpu").manual_seed(seed)

        if exact:
            mats = {k: self.dense(k) for k in ops}
            ev = {k: torch.linalg.eigvalsh(0.5 * (m + m.T)) for k, m in mats.items()}
            k_ = min(top_k, P)
            out["trace"] = {k: dict(value=m.trace().item(), estimator="exact", num_matvecs=P)
                            for k, m in mats.items()}
            out["trace"]["nme"]["num_matvecs"] = 2 * P
            out["top_eigenvalues"] = {k: e.flip(0)[:k_].tolist() for k, e in ev.items()}
            out["eigs_info"] = {k: dict(method="eigvalsh", num_matvecs=P, converged=True)
                                for k in ops}
            out["_ev"] = ev
            out["lambda_min_hessian"] = ev["hessian"][0].item()
            out["lambda_min_nme"] = ev["nme"][0].item()
            out["frobenius"] = {k: m.norm().item() for k, m in mats.items()}
            out["frobenius_estimator"] = "exact"
        else:
            out["trace"] = {}
            for k, op in ops.items():
                val, nmv = estimate_trace(op, trace_estimator, num_matvecs,
                                          seed=int(torch.randint(2**31 - 1, (1,), generator=gen)))
                out["trace"][k] = dict(value=val, estimator=trace_estimator,
                                       num_matvecs=nmv * (nme_cost if k == "nme" else 1))
            out["top_eigenvalues"], out["eigs_info"] = {}, {}
            for k, op in ops.items():
                vals, cnt, ok = _eigsh(op, min(top_k, P - 1), "LA", eigsh_tol, eigsh_maxiter)
                out["top_eigenvalues"][k] = vals
                out["eigs_info"][k] = dict(method="eigsh(LA)", num_matvecs=cnt, converged=ok)
            if lambda_min:
                vals, cnt, ok = _eigsh(self.hessian, 1, "SA", eigsh_tol, eigsh_maxiter)
                out["lambda_min_hessian"] = vals[0] if vals else float("nan")
                out["eigs_info"]["hessian_min"] = dict(method="eigsh(SA)", num_matvecs=cnt,
                                                       converged=ok)
            nfro = max(1, min(num_matvecs, P - 1))
            out["frobenius"] = {}
            for k, op in ops.items():
                if not frobenius:
                    out["frobenius"][k] = float("nan")
                    continue
                torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
                out["frobenius"][k] = math.sqrt(max(hutchinson_squared_fro(op, nfro).item(), 0.0))
            out["frobenius_estimator"] = (f"hutchinson_squared_fro({nfro})" if frobenius
                                          else "skipped")

        tr_h, tr_n = out["trace"]["hessian"]["value"], out["trace"]["nme"]["value"]
        lam_max_h = out["top_eigenvalues"]["hessian"][0] if out["top_eigenvalues"]["hessian"] \
            else float("nan")
        out["ratios"] = {
            "nme_fro_over_hessian_fro": _safe_div(out["frobenius"]["nme"],
                                                  out["frobenius"]["hessian"]),
            "nme_trace_over_hessian_trace": _safe_div(tr_n, tr_h),
            "lambda_min_over_lambda_max_hessian": _safe_div(out.get("lambda_min_hessian",
                                                                    float("nan")), lam_max_h),
        }
        if per_block:
            out["blocks"], out["nme_split"] = self._block_summary(exact, block_num_matvecs, gen,
                                                                  out)
        out["surrogate_check"] = self._surrogate_check(gen)
        if spectral_density:
            ncv = min(density_ncv, P - 1)
            out["spectral_density"] = {}
            for k, op in ops.items():
                if exact:
                    lo, hi = out["_ev"][k][0].item(), out["_ev"][k][-1].item()
                else:
                    lo = _eigsh(op, 1, "SA", eigsh_tol, eigsh_maxiter)[0][0]
                    hi = out["top_eigenvalues"][k][0]
                torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
                grid, dens = lanczos_approximate_spectrum(op, ncv, boundaries=(lo, hi))
                out["spectral_density"][k] = (grid.tolist(), dens.tolist())
        out.pop("_ev", None)
        return out

    def _block_summary(self, exact: bool, nmv: int, gen: torch.Generator, out: dict):
        blocks: dict = {}
        within = 0.0
        tot = {k: out["trace"][k]["value"] for k in ("hessian", "ggn", "nme")}
        for name in self.blocks:
            idx = self.block_indices(name)
            row: dict = {"num_params": len(idx)}
            if exact:
                sub = {k: self.dense(k)[idx][:, idx] for k in ("hessian", "ggn", "nme")}
                for k, m in sub.items():
                    row[f"trace_{k}"] = m.trace().item()
                fro2 = sub["nme"].pow(2).sum().item()
                row["estimator"] = "exact"
            else:
                sub_ops = {k: SubmatrixLinearOperator(getattr(self, k), idx, idx)
                           for k in ("hessian", "ggn", "nme")}
                if len(idx) <= nmv:
                    dense = {k: dense_matrix(o) for k, o in sub_ops.items()}
                    for k, m in dense.items():
                        row[f"trace_{k}"] = m.trace().item()
                    fro2 = dense["nme"].pow(2).sum().item()
                    row["estimator"] = "exact"
                else:
                    m_ = max(1, min(nmv, len(idx) - 1))
                    for k, o in sub_ops.items():
                        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
                        row[f"trace_{k}"] = hutchinson_trace(o, m_).item()
                    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
                    fro2 = max(hutchinson_squared_fro(sub_ops["nme"], min(nmv, len(idx) - 1))
                               .item(), 0.0)
                    row["estimator"] = f"hutchinson({m_})"
            for k in ("hessian", "ggn", "nme"):
                row[f"share_trace_{k}"] = _safe_div(row[f"trace_{k}"], tot[k])
            row["nme_within_fro"] = math.sqrt(fro2)
            within += fro2
            blocks[name] = row
        total = out["frobenius"]["nme"] ** 2
        split = {"within_fro2": within, "cross_fro2": max(total - within, 0.0),
                 "within_share": _safe_div(within, total)}
        return blocks, split

    def _surrogate_check(self, gen: torch.Generator, num_probes: int = 2) -> dict:
        P = self.num_params
        p0 = self.params[0]
        V = torch.randn(P, num_probes, generator=gen, dtype=torch.float64).to(p0.dtype)
        V = V.to(p0.device)
        a = self.nme_surrogate @ V
        b = self.nme @ V
        diff = (a - b).abs().max().item()
        return {"max_abs_diff": diff, "relative": _safe_div(diff, b.abs().max().item()),
                "num_probes": num_probes}


def _safe_div(a: float, b: float) -> float:
    return a / b if b not in (0, 0.0) and math.isfinite(b) else float("nan")


def decompose(
    model: nn.Module,
    loss_fn: nn.Module,
    data,
    params: Sequence[torch.Tensor] | None = None,
    blocks: dict[str, Sequence[str]] | None = None,
    check_deterministic: bool = False,
    progressbar: bool = False,
) -> HessianDecomposition:
    r"""Build ``H``, ``G`` and ``NME = H − G`` for ``loss_fn(model(X), y)`` over ``data``.

    Args:
        model: any ``nn.Module`` (not ``backpack.extend``-ed).
        loss_fn: an ``nn.Module`` loss with ``reduction`` ``'mean'`` or ``'sum'``; curvlinops
            differentiates it as given (e.g. ``nn.MSELoss('mean')`` on ``N × C`` outputs gives
            ``G = 2/(NC) Σ J_nᵀ J_n``; paper A's ``1/(2n) Σ‖·‖²`` is ``nn.MSELoss('sum')`` times
            ``1/(2n)``).
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches (mean losses are renormalised
            over batches by curvlinops).
        params: subset of parameters (default: all trainable ones).
        blocks: block name → parameter names for the per-block summary (default: per module).
        check_deterministic: forwarded to curvlinops (its check costs extra passes).
        progressbar: show curvlinops' tqdm bars.

    Returns:
        :class:`HessianDecomposition` with ``hessian``, ``ggn``, ``nme``, ``nme_surrogate``.
    """
    assert_not_backpack_extended(model, loss_fn)
    _reduction_factor(loss_fn)
    params = select_params(model, params)
    names = param_names(model, params)
    batches = as_batches(data)
    kw = dict(progressbar=progressbar, check_deterministic=check_deterministic)
    H = HessianLinearOperator(model, loss_fn, params, batches, **kw)
    G = GGNLinearOperator(model, loss_fn, params, batches, **kw)
    S = SurrogateNMELinearOperator(model, loss_fn, params, batches, **kw)
    if blocks is None:
        block_idx = group_by_module(names)
    else:
        pos = {n: i for i, n in enumerate(names)}
        try:
            block_idx = {b: [pos[n] for n in ns] for b, ns in blocks.items()}
        except KeyError as err:
            raise ValueError(f"unknown parameter name in blocks: {err}") from None
    return HessianDecomposition(hessian=H, ggn=G, nme=H - G, nme_surrogate=S, params=params,
                                names=names, blocks=block_idx)
