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
:meth:`HessianDecomposition.summary` (a :class:`HessianSummary`) with traces, top eigenvalues,
``λ_min(H)``, Frobenius norms, ratios, per-block shares, the within- vs cross-layer split of the NME
and optional spectral densities. :meth:`~HessianDecomposition.exact_summary` computes them from
the dense matrices; :meth:`~HessianDecomposition.estimated_summary` with curvlinops' estimators
(Hutchinson, Hutch++, XTrace, ``hutchinson_squared_fro``, Papyan's Lanczos densities) and scipy's
``eigsh`` on ``op.to_scipy()``.

Randomness: every random draw comes from a seed. Estimators that draw from torch's global RNG
(curvlinops') run inside :func:`torch.random.fork_rng` seeded per call, so the caller's RNG state is
never changed; the probe vectors of the surrogate check come from a ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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

__all__ = ["decompose", "HessianDecomposition", "HessianSummary", "TraceEstimate", "EigsInfo",
           "Ratios", "BlockSummary", "NMESplit", "SurrogateCheck", "SurrogateNMELinearOperator",
           "nme_surrogate_dense", "dense_matrix", "TRACE_ESTIMATORS", "estimate_trace",
           "assert_not_backpack_extended"]

#: curvlinops trace estimators by name, with the divisor their matvec budget must respect.
TRACE_ESTIMATORS: dict[str, tuple[Callable, int]] = {
    "hutchinson": (hutchinson_trace, 1),
    "hutchpp": (hutchpp_trace, 3),
    "xtrace": (xtrace, 2),
}


@contextmanager
def _seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the body with torch's global generator of the CPU (and of ``device`` when it is a GPU)
    seeded by ``seed``, inside :func:`torch.random.fork_rng`: the caller's RNG state is restored
    afterwards, and no other device's generator is touched."""
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(int(seed))
        yield


def _draw_seed(gen: torch.Generator) -> int:
    """The next per-call seed of a summary's seed sequence."""
    return int(torch.randint(2**31 - 1, (1,), generator=gen, device="cpu"))


def estimate_trace(op: PyTorchLinearOperator, estimator: str = "hutchpp", num_matvecs: int = 90,
                   seed: int | None = None) -> tuple[float, int]:
    """``tr(op)`` by a curvlinops estimator; returns ``(estimate, matvecs used)``.

    ``num_matvecs`` is rounded down to the estimator's divisor (Hutch++: 3, XTrace: 2) and kept
    below the dimension, as curvlinops requires. With a ``seed`` the probe vectors are drawn in a
    forked RNG state seeded by it (the caller's RNG is left as it was); without one they continue
    the caller's global RNG stream.
    """
    if estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"trace estimator must be one of {sorted(TRACE_ESTIMATORS)}")
    fn, div = TRACE_ESTIMATORS[estimator]
    dim = op.shape[0]
    if dim < div + 1:
        raise ValueError(f"operator of size {dim} is too small for {estimator}; use exact traces")
    nmv = max(div, (min(num_matvecs, dim - 1) // div) * div)
    if seed is None:
        return fn(op, nmv).item(), nmv
    with _seeded(seed, op.device):
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


OPERATORS = ("hessian", "ggn", "nme")


@dataclass(frozen=True)
class TraceEstimate:
    """``tr(A)``: its ``value``, the ``estimator`` (``exact``, ``hutchinson``, ``hutchpp`` or
    ``xtrace``) and the matrix-vector products it cost (an NME product through ``H − G`` costs 2)."""

    value: float
    estimator: str
    num_matvecs: int


@dataclass(frozen=True)
class EigsInfo:
    """How extreme eigenvalues were found: ``method`` (``eigvalsh`` on the dense matrix, or ARPACK
    ``eigsh(LA)``/``eigsh(SA)``), its matrix-vector products and whether it converged."""

    method: str
    num_matvecs: int
    converged: bool


@dataclass(frozen=True)
class Ratios:
    """``‖NME‖_F/‖H‖_F``, ``tr(NME)/tr(H)`` and ``λ_min(H)/λ_max(H)`` (``nan`` when undefined)."""

    nme_fro_over_hessian_fro: float
    nme_trace_over_hessian_trace: float
    lambda_min_over_lambda_max_hessian: float


@dataclass(frozen=True)
class BlockSummary:
    """One parameter block ``b`` (by default one module): ``tr(A_bb)`` for ``A`` ∈ {H, G, NME},
    its share ``tr(A_bb)/tr(A)`` and ``‖NME_bb‖_F``, exact or by Hutchinson (``estimator``)."""

    num_params: int
    estimator: str
    trace_hessian: float
    trace_ggn: float
    trace_nme: float
    share_trace_hessian: float
    share_trace_ggn: float
    share_trace_nme: float
    nme_within_fro: float


@dataclass(frozen=True)
class NMESplit:
    """``within = Σ_b ‖NME_bb‖_F²`` (the activation part, where ``φ''`` enters),
    ``cross = ‖NME‖_F² − within`` (clipped at 0) and ``within_share = within / ‖NME‖_F²``."""

    within_fro2: float
    cross_fro2: float
    within_share: float


@dataclass(frozen=True)
class SurrogateCheck:
    """``max |NME_surrogate V − (H − G) V|`` over ``num_probes`` Gaussian probe columns ``V``, and
    that maximum relative to ``max |(H − G) V|``."""

    max_abs_diff: float
    relative: float
    num_probes: int


@dataclass
class HessianSummary:
    """What :meth:`HessianDecomposition.summary` measured (operators keyed ``hessian``, ``ggn``,
    ``nme``).

    Attributes:
        num_params: ``P``.
        mode: ``"exact"`` (dense matrices) or ``"estimated"`` (curvlinops estimators, Lanczos).
        trace: ``{op: TraceEstimate}``.
        top_eigenvalues: ``{op: [λ_1 ≥ λ_2 ≥ …]}`` (top-k).
        eigs_info: ``{op: EigsInfo}`` (plus ``hessian_min`` for ``λ_min(H)`` when estimated).
        lambda_min_hessian: ``λ_min(H)``; ``None`` when it was not computed.
        lambda_min_nme: ``λ_min(NME)`` (exact mode only, else ``None``).
        frobenius: ``{op: ‖A‖_F}`` (``nan`` when skipped); ``frobenius_estimator`` says how.
        ratios: :class:`Ratios`.
        surrogate_check: :class:`SurrogateCheck`.
        blocks: ``{block: BlockSummary}`` and ``nme_split`` (:class:`NMESplit`) when per-block
            summaries were requested, else ``None``.
        spectral_density: ``{op: (grid, density)}`` (Papyan's Lanczos) when requested.
    """

    num_params: int
    mode: str
    trace: dict[str, TraceEstimate]
    top_eigenvalues: dict[str, list[float]]
    eigs_info: dict[str, EigsInfo]
    lambda_min_hessian: float | None
    lambda_min_nme: float | None
    frobenius: dict[str, float]
    frobenius_estimator: str
    ratios: Ratios
    surrogate_check: SurrogateCheck
    blocks: dict[str, BlockSummary] | None = None
    nme_split: NMESplit | None = None
    spectral_density: dict[str, tuple[list[float], list[float]]] | None = None

    def to_dict(self) -> dict:
        """The summary as nested plain dicts and lists (JSON-ready)."""
        return dataclasses.asdict(self)


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
    ) -> HessianSummary:
        r"""Traces, top-k eigenvalues, ``λ_min(H)``, Frobenius norms, ratios and block shares.

        With ``P ≤ exact_max_dim`` this is :meth:`exact_summary` (dense matrices), otherwise
        :meth:`estimated_summary` (curvlinops estimators and Lanczos); the other options are
        those two methods'. Everything random is drawn from ``seed``, and the caller's RNG state
        is left untouched.
        """
        _check_summary_options(trace_estimator, nme_operator)
        if self.num_params <= exact_max_dim:
            return self.exact_summary(top_k=top_k, per_block=per_block,
                                      spectral_density=spectral_density,
                                      density_ncv=density_ncv, seed=seed)
        return self.estimated_summary(
            top_k=top_k, trace_estimator=trace_estimator, num_matvecs=num_matvecs,
            per_block=per_block, block_num_matvecs=block_num_matvecs,
            spectral_density=spectral_density, density_ncv=density_ncv, eigsh_tol=eigsh_tol,
            eigsh_maxiter=eigsh_maxiter, lambda_min=lambda_min, frobenius=frobenius,
            nme_operator=nme_operator, seed=seed)

    def exact_summary(self, top_k: int = 5, per_block: bool = True,
                      spectral_density: bool = False, density_ncv: int = 64,
                      seed: int = 0) -> HessianSummary:
        r"""The summary from the dense matrices ``A = op @ I`` (``P`` matvecs per operator;
        ``NME = H − G``): ``tr(A)``, the spectrum by ``torch.linalg.eigvalsh(½(A + Aᵀ))`` (top-k,
        ``λ_min(H)``, ``λ_min(NME)``), ``‖A‖_F``, per block ``b`` the principal submatrix
        ``A_bb`` (``tr(A_bb)``, ``‖NME_bb‖_F``). ``seed`` draws the surrogate check's probes and
        the optional Lanczos spectral densities (between the exact extreme eigenvalues)."""
        P = self.num_params
        gen = torch.Generator(device="cpu").manual_seed(seed)
        mats = {k: self.dense(k) for k in OPERATORS}
        ev = {k: torch.linalg.eigvalsh(0.5 * (m + m.T)) for k, m in mats.items()}
        k_ = min(top_k, P)
        trace = {k: TraceEstimate(m.trace().item(), "exact", 2 * P if k == "nme" else P)
                 for k, m in mats.items()}
        top = {k: e.flip(0)[:k_].tolist() for k, e in ev.items()}
        fro = {k: m.norm().item() for k, m in mats.items()}
        lam_min_h = ev["hessian"][0].item()
        blocks = split = None
        if per_block:
            fro2 = {}
            rows = {}
            for name in self.blocks:
                idx = self.block_indices(name)
                sub = {k: mats[k][idx][:, idx] for k in OPERATORS}
                fro2[name] = sub["nme"].pow(2).sum().item()
                rows[name] = (len(idx), "exact", {k: m.trace().item() for k, m in sub.items()})
            blocks, split = _blocks_and_split(rows, fro2, trace, fro["nme"])
        surrogate = self._surrogate_check(gen)
        density = None
        if spectral_density:
            bounds = {k: (e[0].item(), e[-1].item()) for k, e in ev.items()}
            density = self._spectral_density(self._operators("difference"), bounds, density_ncv,
                                             gen)
        return HessianSummary(
            num_params=P, mode="exact", trace=trace, top_eigenvalues=top,
            eigs_info={k: EigsInfo("eigvalsh", P, True) for k in OPERATORS},
            lambda_min_hessian=lam_min_h, lambda_min_nme=ev["nme"][0].item(), frobenius=fro,
            frobenius_estimator="exact", ratios=_ratios(trace, fro, top, lam_min_h),
            blocks=blocks, nme_split=split, surrogate_check=surrogate, spectral_density=density)

    def estimated_summary(
        self,
        top_k: int = 5,
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
    ) -> HessianSummary:
        r"""The summary by matrix-vector products only:

        * traces by ``trace_estimator`` ∈ {hutchinson, hutchpp, xtrace} with ``num_matvecs``
          (rounded down to the estimator's divisor and below ``P``);
        * top-k eigenvalues (and ``λ_min(H)`` unless ``lambda_min=False``) by ARPACK Lanczos
          (``eigsh`` on ``to_scipy()``); the matvec counts and convergence flags are recorded;
        * ``‖A‖_F² = tr(AᵀA)`` by ``hutchinson_squared_fro`` (skipped, ``nan``, with
          ``frobenius=False``);
        * per block ``b``: ``tr(A_bb)`` and ``‖NME_bb‖_F²`` on ``SubmatrixLinearOperator``
          (exact when the block has ``≤ block_num_matvecs`` coordinates, else Hutchinson with
          ``block_num_matvecs`` probes, which is robust to the exactly-zero blocks of ReLU nets).

        ``nme_operator="surrogate"`` runs the NME estimators on the surrogate Hessian (one
        double-backward per product) instead of ``H − G`` (two passes); both are exact operators
        for the same matrix, cross-checked in ``surrogate_check``. Each estimator draws its
        probes from its own seed of the sequence started by ``seed`` (in a forked RNG state).
        """
        _check_summary_options(trace_estimator, nme_operator)
        P = self.num_params
        ops = self._operators(nme_operator)
        nme_cost = 2 if nme_operator == "difference" else 1
        gen = torch.Generator(device="cpu").manual_seed(seed)
        trace = {}
        for k, op in ops.items():
            val, nmv = estimate_trace(op, trace_estimator, num_matvecs, seed=_draw_seed(gen))
            trace[k] = TraceEstimate(val, trace_estimator, nmv * (nme_cost if k == "nme" else 1))
        top, info = {}, {}
        for k, op in ops.items():
            vals, cnt, ok = _eigsh(op, min(top_k, P - 1), "LA", eigsh_tol, eigsh_maxiter)
            top[k] = vals
            info[k] = EigsInfo("eigsh(LA)", cnt, ok)
        lam_min_h = None
        if lambda_min:
            vals, cnt, ok = _eigsh(self.hessian, 1, "SA", eigsh_tol, eigsh_maxiter)
            lam_min_h = vals[0] if vals else float("nan")
            info["hessian_min"] = EigsInfo("eigsh(SA)", cnt, ok)
        nfro = max(1, min(num_matvecs, P - 1))
        fro = {}
        for k, op in ops.items():
            if not frobenius:
                fro[k] = float("nan")
                continue
            with _seeded(_draw_seed(gen), op.device):
                fro[k] = math.sqrt(max(hutchinson_squared_fro(op, nfro).item(), 0.0))
        blocks = split = None
        if per_block:
            blocks, split = self._estimated_blocks(block_num_matvecs, gen, trace, fro["nme"])
        surrogate = self._surrogate_check(gen)
        density = None
        if spectral_density:
            bounds = {k: (_eigsh(op, 1, "SA", eigsh_tol, eigsh_maxiter)[0][0], top[k][0])
                      for k, op in ops.items()}
            density = self._spectral_density(ops, bounds, density_ncv, gen)
        return HessianSummary(
            num_params=P, mode="estimated", trace=trace, top_eigenvalues=top, eigs_info=info,
            lambda_min_hessian=lam_min_h, lambda_min_nme=None, frobenius=fro,
            frobenius_estimator=f"hutchinson_squared_fro({nfro})" if frobenius else "skipped",
            ratios=_ratios(trace, fro, top, lam_min_h), blocks=blocks, nme_split=split,
            surrogate_check=surrogate, spectral_density=density)

    def _operators(self, nme_operator: str) -> dict[str, PyTorchLinearOperator]:
        nme = self.nme if nme_operator == "difference" else self.nme_surrogate
        return {"hessian": self.hessian, "ggn": self.ggn, "nme": nme}

    def _estimated_blocks(self, nmv: int, gen: torch.Generator, trace: dict, nme_fro: float):
        rows, fro2 = {}, {}
        for name in self.blocks:
            idx = self.block_indices(name)
            sub_ops = {k: SubmatrixLinearOperator(getattr(self, k), idx, idx)
                       for k in OPERATORS}
            if len(idx) <= nmv:
                dense = {k: dense_matrix(o) for k, o in sub_ops.items()}
                traces = {k: m.trace().item() for k, m in dense.items()}
                fro2[name] = dense["nme"].pow(2).sum().item()
                estimator = "exact"
            else:
                m_ = max(1, min(nmv, len(idx) - 1))
                traces = {}
                for k, o in sub_ops.items():
                    with _seeded(_draw_seed(gen), o.device):
                        traces[k] = hutchinson_trace(o, m_).item()
                with _seeded(_draw_seed(gen), sub_ops["nme"].device):
                    fro2[name] = max(hutchinson_squared_fro(sub_ops["nme"],
                                                            min(nmv, len(idx) - 1)).item(), 0.0)
                estimator = f"hutchinson({m_})"
            rows[name] = (len(idx), estimator, traces)
        return _blocks_and_split(rows, fro2, trace, nme_fro)

    def _spectral_density(self, ops: dict, bounds: dict, ncv: int, gen: torch.Generator) -> dict:
        """Papyan's Lanczos density of each operator on ``[λ_min, λ_max]``, one seed each."""
        ncv = min(ncv, self.num_params - 1)
        out = {}
        for k, op in ops.items():
            with _seeded(_draw_seed(gen), op.device):
                grid, dens = lanczos_approximate_spectrum(op, ncv, boundaries=bounds[k])
            out[k] = (grid.tolist(), dens.tolist())
        return out

    def _surrogate_check(self, gen: torch.Generator, num_probes: int = 2) -> SurrogateCheck:
        P = self.num_params
        p0 = self.params[0]
        V = torch.randn(P, num_probes, generator=gen, dtype=torch.float64, device="cpu")
        V = V.to(p0.device, p0.dtype)
        a = self.nme_surrogate @ V
        b = self.nme @ V
        diff = (a - b).abs().max().item()
        return SurrogateCheck(diff, _safe_div(diff, b.abs().max().item()), num_probes)


def _check_summary_options(trace_estimator: str, nme_operator: str) -> None:
    if trace_estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"trace_estimator must be one of {sorted(TRACE_ESTIMATORS)}")
    if nme_operator not in ("difference", "surrogate"):
        raise ValueError("nme_operator must be 'difference' (H − G) or 'surrogate'")


def _ratios(trace: dict[str, TraceEstimate], fro: dict[str, float], top: dict[str, list[float]],
            lambda_min_hessian: float | None) -> Ratios:
    lam_max_h = top["hessian"][0] if top["hessian"] else float("nan")
    lam_min_h = float("nan") if lambda_min_hessian is None else lambda_min_hessian
    return Ratios(_safe_div(fro["nme"], fro["hessian"]),
                  _safe_div(trace["nme"].value, trace["hessian"].value),
                  _safe_div(lam_min_h, lam_max_h))


def _blocks_and_split(rows: dict[str, tuple[int, str, dict[str, float]]], fro2: dict[str, float],
                      trace: dict[str, TraceEstimate], nme_fro: float
                      ) -> tuple[dict[str, BlockSummary], NMESplit]:
    """Block summaries (shares ``tr(A_bb)/tr(A)``) and the within/cross split of ``‖NME‖_F²``
    from per-block ``(num_params, estimator, {op: tr(A_bb)})`` and ``‖NME_bb‖_F²``."""
    blocks = {}
    for name, (n, estimator, tr) in rows.items():
        blocks[name] = BlockSummary(
            num_params=n, estimator=estimator, trace_hessian=tr["hessian"], trace_ggn=tr["ggn"],
            trace_nme=tr["nme"],
            share_trace_hessian=_safe_div(tr["hessian"], trace["hessian"].value),
            share_trace_ggn=_safe_div(tr["ggn"], trace["ggn"].value),
            share_trace_nme=_safe_div(tr["nme"], trace["nme"].value),
            nme_within_fro=math.sqrt(fro2[name]))
    within = sum(fro2.values())
    total = nme_fro ** 2
    return blocks, NMESplit(within, max(total - within, 0.0), _safe_div(within, total))


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
