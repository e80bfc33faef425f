r"""Gauss-Newton conditioning (Zhao, Singh & Lucchi, NeurIPS 2024).

**Column-space condition number.** ``G = Σ_B c_B J_Bᵀ H_{z,B} J_B`` is heavily rank deficient, so
``κ(G) = λ_max(G) / λ_min^{≠0}(G)`` is taken on its column space ``range(Jᵀ)``. With
``S = blockdiag_B (c_B H_{z,B})^{1/2}`` the nonzero eigenvalues of ``G = Jᵀ S² J`` equal those of the
Gram matrix ``S J Jᵀ S`` (``nC × nC``), so :func:`gn_condition_number` works on whichever side is
smaller: the dense ``P × P`` GGN (curvlinops) or the Gram built from the empirical NTK
(:func:`~gnrev_plugin.metrics.ntk.empirical_ntk`, structured for RevMLP).

**Rank cut.** ``rank = #{λ_i > rtol · λ_max}``; the default ``rtol = m · eps(dtype)`` (``m`` the side
of the matrix used) is ``torch.linalg.matrix_rank``'s rule. The report lists κ for neighbouring
ranks and for a sweep of ``rtol`` (the rank-sensitivity plot of the paper's appendix), plus the
spectral gap ``λ_r / λ_{r+1}`` at the cut.

**Deep linear networks** ``F(x) = W_L ⋯ W_1 x`` (``W_l ∈ R^{m_l×m_{l−1}}``, ``m_0 = d``, ``m_L = k``),
``W_{<l} = W_{l−1}⋯W_1``, ``W_{>l} = W_L⋯W_{l+1}``, ``Σ = XXᵀ/n``, loss ``1/(2n) Σ‖F − y‖²``,
column-major ``vec``:

* Jacobian block ``∂F(x)/∂vec W_l = (W_{<l}x)ᵀ ⊗ W_{>l}``; ``G = Uᵀ(Σ ⊗ I_k)U`` with
  ``U = [W_{<l}ᵀ ⊗ W_{>l}]_l``;
* spectrum lemma: nonzero ``eig(G)`` = ``eig((Σ^{1/2} ⊗ I_k) M (Σ^{1/2} ⊗ I_k))``,
  ``M = U Uᵀ = Σ_l (W_{<l}ᵀW_{<l}) ⊗ (W_{>l}W_{>l}ᵀ)``;
* rank ``q(r + k − q)``, ``r = rank Σ``, ``q = min(r, k, m_1, …, m_{L−1})``;
* bound ``κ(G) ≤ κ(Σ) Σ_l σ²_max(W_{<l})σ²_max(W_{>l}) / Σ_l σ²_min(W_{<l})σ²_min(W_{>l})
  = κ(Σ) Σ_l γ_l κ²(W_{<l})κ²(W_{>l})`` (convex combination, ``γ_l ∝ σ²_min σ²_min``) and the
  loose bound ``κ(Σ) max_l κ²(W_{<l})κ²(W_{>l})``; ``σ_min(W_{<l}) := σ_d``, ``σ_min(W_{>l}) := σ_k``;
* one hidden layer, whitened data: ``eig(M) = {σ_i²(W₁) + σ_j²(W₂)}`` and
  ``κ = (σ²_max(W₁) + σ²_max(W₂)) / (σ²_d(W₁) + σ²_k(W₂))`` (the bound with equality);
* residual layers ``W_l → W_l + βI``; for aligned singular vectors
  ``κ(W + βI) = (σ_max + β)/(σ_min + β)``, and for ``β > σ_max`` always
  ``κ(W + βI) ≤ (β + σ_max)/(β − σ_max)``;
* two-layer ReLU ``F(x) = W φ(Vx)``: ``(JJᵀ)_{ij} = ⟨φ_i, φ_j⟩ I_k + ⟨x_i, x_j⟩ W D_i D_j Wᵀ``,
  ``D_i = diag(1[Vx_i > 0])``, ``φ_i = φ(Vx_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import hessian

from ._params import as_batches, select_params
from .ntk import empirical_ntk

__all__ = [
    "ConditionReport", "gn_condition_number", "condition_number_from_eigenvalues",
    "default_rtol", "gn_gram_matrix",
    "deep_linear_partial_products", "deep_linear_jacobian_factor", "spectrum_lemma_matrix",
    "deep_linear_gn_spectrum", "deep_linear_gn_rank", "deep_linear_condition_bounds",
    "whitened_two_layer_condition_number", "residual_weights", "residual_layer_condition_number",
    "residual_layer_condition_bound", "two_layer_relu_gram", "matrix_condition_number",
]


# ---------------------------------------------------------------------------- column-space κ
def default_rtol(dim: int, dtype: torch.dtype) -> float:
    r""":math:`n\,\epsilon_{\mathrm{dtype}}`, the ``torch.linalg.matrix_rank`` rule.

    Args:
        dim, dtype: Matrix dimension :math:`n` and the type whose :math:`\epsilon` is used.

    Returns:
        The relative tolerance :math:`n\,\epsilon_{\mathrm{dtype}}`.
    """
    return dim * torch.finfo(dtype).eps


@dataclass
class ConditionReport:
    """κ of a PSD matrix on its column space.

    Attributes:
        kappa: ``λ_1 / λ_r``.
        rank: ``r = #{λ_i > rtol · λ_1}``.
        lambda_max, lambda_min_nonzero: ``λ_1`` and ``λ_r``.
        rtol: the relative tolerance used.
        side: ``"parameter"`` (dense ``P×P`` G) or ``"gram"`` (``nC×nC``).
        eigenvalues: all eigenvalues, descending (float64, on CPU).
        gap: ``λ_r / λ_{r+1}`` (``inf`` when ``r`` is the full dimension).
        rank_sensitivity: ``[{"rank", "kappa"}]`` for ranks around ``r``.
        rtol_sensitivity: ``[{"rtol", "rank", "kappa"}]`` for a sweep of tolerances.
    """

    kappa: float
    rank: int
    lambda_max: float
    lambda_min_nonzero: float
    rtol: float
    side: str
    eigenvalues: torch.Tensor = field(repr=False)
    gap: float = math.inf
    rank_sensitivity: list[dict] = field(default_factory=list, repr=False)
    rtol_sensitivity: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        """The report as a plain dict (every field except the eigenvalues).

        Returns:
            The dataclass fields other than ``eigenvalues``, by name.
        """
        return dict(kappa=self.kappa, rank=self.rank, lambda_max=self.lambda_max,
                    lambda_min_nonzero=self.lambda_min_nonzero, rtol=self.rtol, side=self.side,
                    gap=self.gap, rank_sensitivity=self.rank_sensitivity,
                    rtol_sensitivity=self.rtol_sensitivity)


def condition_number_from_eigenvalues(eigenvalues: torch.Tensor, rtol: float | None = None,
                                      side: str = "matrix", rank_window: int = 3,
                                      rtol_sweep: Sequence[float] = tuple(
                                          10.0 ** -e for e in range(2, 16, 2))
                                      ) -> ConditionReport:
    r""":math:`\kappa` on the column space from the eigenvalues of a PSD matrix (:class:`ConditionReport`).

    Args:
        eigenvalues: Eigenvalues of a PSD matrix, any order and shape.
        rtol: Relative rank tolerance; default :func:`default_rtol` of the number of eigenvalues.
        side: Label stored in the report (``"parameter"``, ``"gram"`` or ``"matrix"``).
        rank_window, rtol_sweep: Ranks :math:`r \pm` ``rank_window`` and tolerances for the sensitivities.

    Returns:
        The :class:`ConditionReport`.

    Raises:
        ValueError: If no eigenvalue is positive (:math:`\kappa` undefined).
    """
    ev = torch.as_tensor(eigenvalues, device="cpu").detach().double().flatten().sort(descending=True).values
    if ev.numel() == 0 or not ev[0] > 0:
        raise ValueError("the matrix has no positive eigenvalue; κ is undefined")
    rtol = default_rtol(ev.numel(), torch.float64) if rtol is None else float(rtol)
    lam1 = ev[0].item()

    def rank_at(tol):
        return int((ev > tol * lam1).sum())

    r = rank_at(rtol)
    rank_sens = [dict(rank=q, kappa=lam1 / ev[q - 1].item() if ev[q - 1] > 0 else math.inf)
                 for q in range(max(1, r - rank_window), min(ev.numel(), r + rank_window) + 1)]
    rtol_sens = []
    for t in rtol_sweep:
        q = rank_at(t)
        rtol_sens.append(dict(rtol=t, rank=q, kappa=lam1 / ev[q - 1].item()))
    gap = ev[r - 1].item() / ev[r].item() if r < ev.numel() and ev[r] > 0 else math.inf
    return ConditionReport(kappa=lam1 / ev[r - 1].item(), rank=r, lambda_max=lam1,
                           lambda_min_nonzero=ev[r - 1].item(), rtol=rtol, side=side,
                           eigenvalues=ev, gap=gap, rank_sensitivity=rank_sens,
                           rtol_sensitivity=rtol_sens)


def _loss_hessian_sqrt(loss_fn: nn.Module, z: torch.Tensor, y: torch.Tensor, weight: float
                       ) -> torch.Tensor:
    """``(weight · ∇²_z ℓ_B)^{1/2}`` as an ``(N_B C × N_B C)`` matrix (sample-major)."""
    n, C = z.shape[0], z[0].numel()
    Hz = hessian(lambda zz: loss_fn(zz, y))(z.detach()).reshape(n * C, n * C) * weight
    blocks = Hz.view(n, C, n, C)
    diag = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)            # (n, C, C)
    offdiag = Hz.abs().sum() - diag.abs().sum()
    if offdiag > 1e-12 * Hz.abs().sum():                                # not per-sample separable
        w, V = torch.linalg.eigh(0.5 * (Hz + Hz.T))
        return (V * w.clamp_min(0).sqrt()) @ V.T
    w, V = torch.linalg.eigh(0.5 * (diag + diag.transpose(1, 2)))
    roots = (V * w.clamp_min(0).sqrt()[:, None, :]) @ V.transpose(1, 2)
    return torch.block_diag(*roots)


def gn_gram_matrix(model: nn.Module, loss_fn: nn.Module, data,
                   ntk_method: str = "auto") -> torch.Tensor:
    r""":math:`S J J^\top S` (``nC × nC``), whose nonzero spectrum is that of :math:`G = J^\top S^2 J`.

    :math:`S = \operatorname{blockdiag}_B (c_B \nabla^2_z \ell_B)^{1/2}` with :math:`c_B = N_B/N` (mean)
    or 1 (sum), matching curvlinops' ``GGNLinearOperator`` on the same ``loss_fn`` and batches.

    Args:
        model: The network :math:`f_\theta`.
        loss_fn: Loss module with reduction ``"mean"`` or ``"sum"``.
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches.
        ntk_method: How :math:`J J^\top` is formed (see :func:`~gnrev_plugin.metrics.ntk.empirical_ntk`).

    Returns:
        The sample-major ``(nC, nC)`` matrix :math:`S J J^\top S`.

    Raises:
        ValueError: If ``loss_fn``'s reduction is neither ``"mean"`` nor ``"sum"``.
    """
    batches = as_batches(data, model, loss_fn, "gn_gram_matrix")
    red = getattr(loss_fn, "reduction", None)
    if red not in ("mean", "sum"):
        raise ValueError("loss_fn must have reduction 'mean' or 'sum'")
    N = sum(X.shape[0] for X, _ in batches)
    roots = []
    with torch.no_grad():
        for X, y in batches:
            z = model(X)
            roots.append(_loss_hessian_sqrt(loss_fn, z, y, X.shape[0] / N if red == "mean"
                                            else 1.0))
    S = torch.block_diag(*roots)
    X_all = torch.cat([X for X, _ in batches])
    K = empirical_ntk(model, X_all, method=ntk_method)
    return S @ K @ S


def gn_condition_number(model: nn.Module, loss_fn: nn.Module, data, rtol: float | None = None,
                        side: str = "auto", params: Sequence[torch.Tensor] | None = None,
                        rank_window: int = 3) -> ConditionReport:
    """κ(G) = λ_max / λ_min^{≠0} of the GGN of ``loss_fn(model(X), y)`` over ``data``.

    Args:
        rtol: relative eigenvalue cut for the rank (default ``m · eps``, ``m`` the matrix side).
        side: ``"parameter"`` (dense ``P × P`` GGN from curvlinops), ``"gram"`` (``nC × nC``
            Gram from the empirical NTK; all parameters) or ``"auto"`` (the smaller one).
        params: parameter subset (forces the parameter side).

    Returns:
        :class:`ConditionReport` (``kappa``, ``rank``, ``rtol``, sensitivity to the rank cut).
    """
    batches = as_batches(data, model, loss_fn, "gn_condition_number")
    P = sum(p.numel() for p in select_params(model, params))
    with torch.no_grad():
        nC = sum(model(X)[0].numel() * X.shape[0] for X, _ in batches)
    if side == "auto":
        side = "parameter" if (params is not None or P <= nC) else "gram"
    if side == "parameter":
        from curvlinops import GGNLinearOperator

        from .hessian import dense_matrix  # curvlinops-based

        G = dense_matrix(GGNLinearOperator(model, loss_fn, select_params(model, params), batches,
                                           check_deterministic=False))
        ev = torch.linalg.eigvalsh(0.5 * (G + G.T))
    elif side == "gram":
        if params is not None:
            raise ValueError("the Gram side uses all parameters; use side='parameter' for a subset")
        K = gn_gram_matrix(model, loss_fn, batches)
        ev = torch.linalg.eigvalsh(0.5 * (K + K.T))
    else:
        raise ValueError("side must be 'auto', 'parameter' or 'gram'")
    return condition_number_from_eigenvalues(ev, rtol, side=side, rank_window=rank_window)


# ---------------------------------------------------------------------------- deep linear nets
def matrix_condition_number(A: torch.Tensor, sigma_min_index: int | None = None) -> float:
    r""":math:`\sigma_{\max}(A) / \sigma_j(A)` with :math:`j` = ``sigma_min_index`` (1-based; default: the
    last).

    Args:
        A: Any matrix.
        sigma_min_index: 1-based index :math:`j` of the smallest singular value used.

    Returns:
        The ratio; ``inf`` when :math:`A` has fewer than :math:`j` singular values or :math:`\sigma_j = 0`.
    """
    s = torch.linalg.svdvals(A.double())
    j = s.numel() if sigma_min_index is None else sigma_min_index
    if j > s.numel() or s[j - 1] == 0:
        return math.inf
    return (s[0] / s[j - 1]).item()


def deep_linear_partial_products(Ws: Sequence[torch.Tensor]
                                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""The partial products :math:`W_{<l}` and :math:`W_{>l}`, :math:`l = 1, \dots, L`
    (:math:`W_{<1} = I_d`, :math:`W_{>L} = I_k`).

    Args:
        Ws: Weights :math:`W_1, \dots, W_L` of :math:`F = W_L \cdots W_1 x`.

    Returns:
        ``(left, right)`` with ``left[l] =`` :math:`W_{<l}` and ``right[l] =`` :math:`W_{>l}`.

    Raises:
        ValueError: If ``Ws`` is empty or two consecutive shapes do not chain.
    """
    if not Ws:
        raise ValueError("need at least one weight matrix")
    for a, b in zip(Ws[:-1], Ws[1:], strict=True):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"incompatible shapes {tuple(a.shape)} then {tuple(b.shape)}")
    d, k = Ws[0].shape[1], Ws[-1].shape[0]
    W = [w.double() for w in Ws]
    before = [torch.eye(d, dtype=torch.float64, device=W[0].device)]
    for w in W[:-1]:
        before.append(w @ before[-1])
    after = [torch.eye(k, dtype=torch.float64, device=W[0].device)]
    for w in reversed(W[1:]):
        after.insert(0, after[0] @ w)
    return before, after


def deep_linear_jacobian_factor(Ws: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The Jacobian factor :math:`U = [W_{<l}^\top \otimes W_{>l}]_l`, :math:`J(x) = (x^\top \otimes I_k) U`.

    Args:
        Ws: Weights :math:`W_1, \dots, W_L`.

    Returns:
        :math:`U = [W_{<l}^\top \otimes W_{>l}]_l \in \mathbb{R}^{dk \times P}`.
    """
    before, after = deep_linear_partial_products(Ws)
    return torch.cat([torch.kron(b.T.contiguous(), a) for b, a in zip(before, after, strict=True)], dim=1)


def spectrum_lemma_matrix(Ws: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The spectrum-lemma matrix :math:`M = \sum_l (W_{<l}^\top W_{<l}) \otimes (W_{>l} W_{>l}^\top)`.

    Args:
        Ws: Weights :math:`W_1, \dots, W_L`.

    Returns:
        :math:`M = \sum_l (W_{<l}^\top W_{<l}) \otimes (W_{>l} W_{>l}^\top)`, ``(dk, dk)``.
    """
    before, after = deep_linear_partial_products(Ws)
    return sum(torch.kron(b.T @ b, a @ a.T) for b, a in zip(before, after, strict=True))


def _psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(0.5 * (S + S.T))
    return (V * w.clamp_min(0).sqrt()) @ V.T


def deep_linear_gn_spectrum(Ws: Sequence[torch.Tensor], Sigma: torch.Tensor | None = None
                            ) -> torch.Tensor:
    r"""The deep linear net's GN spectrum,
    :math:`\operatorname{eig}((\Sigma^{1/2} \otimes I_k) M (\Sigma^{1/2} \otimes I_k))`.

    Args:
        Ws, Sigma: Weights :math:`W_1, \dots, W_L`; input second moment :math:`\Sigma` (``None``: :math:`I`).

    Returns:
        The eigenvalues of :math:`(\Sigma^{1/2} \otimes I_k) M (\Sigma^{1/2} \otimes I_k)`, descending.
    """
    M = spectrum_lemma_matrix(Ws)
    k = Ws[-1].shape[0]
    if Sigma is not None:
        R = torch.kron(_psd_sqrt(Sigma.double()),
                       torch.eye(k, dtype=torch.float64, device=Sigma.device))
        M = R @ M @ R
    return torch.linalg.eigvalsh(0.5 * (M + M.T)).flip(0)


def deep_linear_gn_rank(widths: Sequence[int], k: int, r: int) -> int:
    r"""The deep linear net's GN rank :math:`q(r + k - q)`, :math:`q = \min(r, k, m_1, \dots, m_{L-1})`.

    Args:
        widths, k, r: Hidden widths :math:`m_1, \dots, m_{L-1}`, output dimension, rank of :math:`\Sigma`.

    Returns:
        :math:`q(r + k - q)`, :math:`q = \min(r, k, m_1, \dots, m_{L-1})`.
    """
    q = min([r, k, *widths])
    return q * (r + k - q)


def _sigma_or_zero(s: torch.Tensor, j: int, shape: Sequence[int]) -> float:
    """``σ_j`` (1-based) of a matrix with singular values ``s``, or 0 when it has fewer than ``j``
    or ``σ_j ≤ max(shape)·eps·σ_1`` (``torch.linalg.matrix_rank``'s rule): a partial product behind
    a bottleneck is exactly rank-deficient and its ``σ_j`` is rounding noise, not a bound."""
    if s.numel() < j or not s[j - 1] > max(shape) * torch.finfo(s.dtype).eps * s[0]:
        return 0.0
    return s[j - 1].item()


def deep_linear_condition_bounds(Ws: Sequence[torch.Tensor], Sigma: torch.Tensor | None = None
                                 ) -> dict:
    r"""The convex-combination and loose upper bounds on :math:`\kappa(G)` for a deep linear net.

    Returns ``{"convex", "loose", "gammas", "kappa_sigma", "terms"}``; bounds are ``inf`` when
    every ``σ²_min(W_{<l})σ²_min(W_{>l})`` vanishes (resp. any, for the loose bound). A ``σ_min``
    at rounding level (``≤ max(shape)·eps·σ_max``, a product behind a bottleneck) counts as 0.

    Args:
        Ws, Sigma: Weights :math:`W_1, \dots, W_L`; input second moment :math:`\Sigma` (``None``: :math:`I`).

    Returns:
        ``{"convex", "loose", "gammas", "kappa_sigma", "terms"}`` (bounds on :math:`\kappa(G)`).
    """
    before, after = deep_linear_partial_products(Ws)
    d, k = Ws[0].shape[1], Ws[-1].shape[0]
    if Sigma is None:
        kappa_sigma = 1.0
    else:
        ev = torch.linalg.eigvalsh(Sigma.double())
        kappa_sigma = (ev[-1] / ev[0]).item() if ev[0] > 0 else math.inf
    terms = []
    for b, a in zip(before, after, strict=True):
        sb, sa = torch.linalg.svdvals(b), torch.linalg.svdvals(a)
        smin_b, smin_a = _sigma_or_zero(sb, d, b.shape), _sigma_or_zero(sa, k, a.shape)
        terms.append(dict(max2=(sb[0] * sa[0]).item() ** 2, min2=(smin_b * smin_a) ** 2))
    den = sum(t["min2"] for t in terms)
    convex = kappa_sigma * sum(t["max2"] for t in terms) / den if den > 0 else math.inf
    gammas = [t["min2"] / den if den > 0 else math.nan for t in terms]
    loose = kappa_sigma * max((t["max2"] / t["min2"] if t["min2"] > 0 else math.inf)
                              for t in terms)
    return dict(convex=convex, loose=loose, gammas=gammas, kappa_sigma=kappa_sigma, terms=terms)


def whitened_two_layer_condition_number(W1: torch.Tensor, W2: torch.Tensor) -> float:
    r""":math:`\kappa(G)` of the whitened (:math:`\Sigma = I`) two-layer linear net :math:`F = W_2 W_1 x`.

    Args:
        W1, W2: The layer weights :math:`W_1`, :math:`W_2`.

    Returns:
        :math:`(\sigma^2_{\max}(W_1) + \sigma^2_{\max}(W_2)) / (\sigma^2_d(W_1) + \sigma^2_k(W_2))`.
    """
    d, k = W1.shape[1], W2.shape[0]
    s1, s2 = torch.linalg.svdvals(W1.double()), torch.linalg.svdvals(W2.double())
    lo1 = s1[d - 1].item() if s1.numel() >= d else 0.0
    lo2 = s2[k - 1].item() if s2.numel() >= k else 0.0
    den = lo1**2 + lo2**2
    return (s1[0].item() ** 2 + s2[0].item() ** 2) / den if den > 0 else math.inf


def residual_weights(Ws: Sequence[torch.Tensor], beta: float,
                     residual_layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    r""":math:`W_l + \beta I` for the residual layers (0-based; default: the square hidden-to-hidden
    layers ``2..L−1`` in 1-based numbering), other layers unchanged.

    Args:
        Ws, beta: Weights :math:`W_1, \dots, W_L` and residual scale :math:`\beta`.
        residual_layers: 0-based indices of the layers that get :math:`+\beta I`.

    Returns:
        The new list of weights.

    Raises:
        ValueError: If a residual layer is not square.
    """
    L = len(Ws)
    layers = range(1, L - 1) if residual_layers is None else residual_layers
    out = list(Ws)
    for l in layers:
        W = Ws[l]
        if W.shape[0] != W.shape[1]:
            raise ValueError(f"residual layer {l} must be square, got {tuple(W.shape)}")
        out[l] = W + beta * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return out


def residual_layer_condition_number(W: torch.Tensor, beta: float) -> float:
    r""":math:`(\sigma_{\max} + \beta)/(\sigma_{\min} + \beta)`: :math:`\kappa(W + \beta I)` when :math:`W`'s
    singular vectors align (e.g. :math:`W`
    symmetric PSD).

    Args:
        W, beta: Square weight :math:`W` and residual scale :math:`\beta`.

    Returns:
        :math:`(\sigma_{\max} + \beta)/(\sigma_{\min} + \beta)`.
    """
    s = torch.linalg.svdvals(W.double())
    return ((s[0] + beta) / (s[-1] + beta)).item()


def residual_layer_condition_bound(W: torch.Tensor, beta: float) -> float:
    r"""The bound :math:`(\beta + \sigma_{\max})/(\beta - \sigma_{\max}) \ge \kappa(W + \beta I)`, any
    :math:`W`, :math:`\beta > \sigma_{\max}`.

    Args:
        W, beta: Square weight :math:`W` and residual scale :math:`\beta > \sigma_{\max}(W)`.

    Returns:
        :math:`(\beta + \sigma_{\max})/(\beta - \sigma_{\max}) \ge \kappa(W + \beta I)`.

    Raises:
        ValueError: If :math:`\beta \le \sigma_{\max}(W)`.
    """
    smax = torch.linalg.svdvals(W.double())[0].item()
    if not beta > smax:
        raise ValueError(f"the assumption-free bound needs β > σ_max(W) = {smax:.4g}")
    return (beta + smax) / (beta - smax)


def two_layer_relu_gram(W: torch.Tensor, V: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    r""":math:`J J^\top` of :math:`F(x) = W \operatorname{relu}(V x)` w.r.t. :math:`(V, W)`, sample-major
    ``(nk × nk)``:

    .. math::

        (J J^\top)_{ij} = \langle \phi_i, \phi_j \rangle I_k
        + \langle x_i, x_j \rangle\, W D_i D_j W^\top.

    Args:
        W, V, X: Readout weight ``(k, m)``, hidden weight ``(m, d)``, inputs ``(n, d)``.

    Returns:
        The ``(nk, nk)`` Gram matrix :math:`J J^\top`.
    """
    X, W, V = X.double(), W.double(), V.double()
    H = X @ V.T                                   # (n, m)
    phi, D = torch.relu(H), (H > 0).double()
    n, k = X.shape[0], W.shape[0]
    first = torch.kron(phi @ phi.T, torch.eye(k, dtype=torch.float64, device=X.device))
    WD = W[None] * D[:, None, :]                  # (n, k, m): W D_i
    second = torch.einsum("iau,jbu->iajb", WD, WD) * (X @ X.T)[:, None, :, None]
    return first + second.reshape(n * k, n * k)
