"""``H = G + NME`` as curvlinops operators (:func:`decompose`) and their summary.

:class:`HessianDecomposition` holds the operators and computes a :class:`HessianSummary` exactly
from the dense matrices or by matrix-vector products only (:mod:`.estimators`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    SubmatrixLinearOperator,
    hutchinson_squared_fro,
    hutchinson_trace,
    lanczos_approximate_spectrum,
)
from torch import nn

from ...compat.curvlinops import PyTorchLinearOperator
from .._params import as_batches, flat_indices, group_by_module, param_names, select_params
from .estimators import _draw_seed, _eigsh, _seeded, estimate_trace
from .operators import (
    SurrogateNMELinearOperator,
    _reduction_factor,
    assert_not_backpack_extended,
    dense_matrix,
)
from .summaries import (
    OPERATORS,
    EigsInfo,
    HessianSummary,
    SurrogateCheck,
    TraceEstimate,
    _blocks_and_split,
    _check_summary_options,
    _ratios,
    _safe_div,
)

__all__ = ["HessianDecomposition", "decompose"]


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
        """Number of parameters.

        Returns:
            :math:`P`.
        """
        return self.hessian.shape[0]

    def dense(self, which: str) -> torch.Tensor:
        """Dense ``"hessian"``, ``"ggn"``, ``"nme"`` (= H − G) or ``"nme_surrogate"`` (cached).

        Args:
            which: ``"hessian"``, ``"ggn"``, ``"nme"`` or ``"nme_surrogate"``.

        Returns:
            The dense ``(P, P)`` matrix (:math:`H`, :math:`G`, :math:`H - G` or the surrogate NME).
        """
        if which not in self._dense:
            if which == "nme":
                self._dense[which] = self.dense("hessian") - self.dense("ggn")
            else:
                self._dense[which] = dense_matrix(getattr(self, which))
        return self._dense[which]

    def block_indices(self, name: str) -> list[int]:
        """Flat parameter-vector indices of block ``name``.

        Args:
            name: A key of :attr:`blocks`.

        Returns:
            The flat indices.
        """
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

        Args:
            top_k: Number of top eigenvalues.
            exact_max_dim: Largest :math:`P` handled with dense matrices.
            trace_estimator: ``"hutchinson"``, ``"hutchpp"`` or ``"xtrace"`` (estimated mode).
            num_matvecs: Products per trace estimate.
            per_block: Also summarise each block.
            block_num_matvecs: Products per block trace estimate.
            spectral_density: Also compute Lanczos spectral densities.
            density_ncv: Lanczos vectors for the densities.
            eigsh_tol: ARPACK tolerance.
            eigsh_maxiter: ARPACK iteration limit.
            lambda_min: Also compute :math:`\lambda_{\min}(H)` (estimated mode).
            frobenius: Also estimate Frobenius norms (estimated mode).
            nme_operator: ``"difference"`` (:math:`H - G`) or ``"surrogate"``.
            seed: Seed of everything random.

        Returns:
            The :class:`HessianSummary`.
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
        the optional Lanczos spectral densities (between the exact extreme eigenvalues).

        Args:
            top_k: Number of top eigenvalues.
            per_block: Also summarise each block.
            spectral_density: Also compute Lanczos spectral densities.
            density_ncv: Lanczos vectors for the densities.
            seed: Seed of the probes and densities.

        Returns:
            The :class:`HessianSummary` with ``mode="exact"``.
        """
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

        The arguments are :meth:`summary`'s (documented there).

        Returns:
            The :class:`HessianSummary` with ``mode="estimated"``.
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
    batches = as_batches(data, model, loss_fn, "decompose")
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
