r"""Centered kernel alignment (CKA) and representation capture.

For representations ``X ∈ R^{n×p}``, ``Y ∈ R^{n×q}`` of the same ``n`` inputs with Gram matrices
``K = k(X)``, ``L = l(Y)`` (linear: ``K = XXᵀ``; RBF: ``K_ij = exp(−‖x_i − x_j‖² / (2σ²))``):

    HSIC(K, L) = tr(K H L H) / (n − 1)²,           H = I − 11ᵀ/n       (biased, Gretton et al. 2005)
    CKA(K, L)  = HSIC(K, L) / √(HSIC(K, K) HSIC(L, L))                 (Kornblith et al. 2019)

The unbiased estimator (Song et al. 2012) uses ``K̃, L̃`` with zeroed diagonals:

    HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))

Linear CKA with the biased estimator lies in ``[0, 1]``, equals 1 for ``X = Y`` and is invariant to
orthogonal maps and isotropic scaling of either argument; the unbiased version can be slightly
negative for unrelated representations (it is not clipped).

Representation capture uses forward hooks on named submodules of any ``nn.Module``; for a RevMLP
:func:`revmlp_representations` returns ``[X1, X2]`` after every coupling half-layer (as the reference
code's CKA plots do) or after every block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.validation import check_tensor

__all__ = ["hsic", "cka", "linear_cka", "rbf_cka", "linear_kernel", "rbf_kernel",
           "capture_representations", "revmlp_representations", "cka_by_layer"]


def _as_matrix(X: torch.Tensor, who: str = "representation", name: str = "X") -> torch.Tensor:
    if isinstance(X, torch.Tensor) and X.dim() < 2:
        raise ValueError(f"representations must be (n, ...) with n samples, got {tuple(X.shape)}")
    check_tensor(who, name, X, min_dim=2)       # non-empty and finite (NaN is not "constant")
    return X.reshape(X.shape[0], -1).double()


def linear_kernel(X: torch.Tensor) -> torch.Tensor:
    r"""The linear kernel :math:`K = X X^\top` (samples flattened).

    Args:
        X: Representations ``(n, ...)``.

    Returns:
        :math:`K = X X^\top`, ``(n, n)``.
    """
    X = _as_matrix(X)
    return X @ X.T


def rbf_kernel(X: torch.Tensor, sigma: float | None = None, median_factor: float = 1.0
               ) -> torch.Tensor:
    r"""The RBF kernel; :math:`\sigma` = ``median_factor``
    :math:`\cdot \operatorname{median}_{i \neq j} \lVert x_i - x_j \rVert` by
    default (the heuristic of Kornblith et al. 2019).

    Args:
        X: Representations ``(n, ...)``.
        sigma: Bandwidth :math:`\sigma`; default the median heuristic.
        median_factor: Factor on the median distance.

    Returns:
        :math:`K_{ij} = \exp(-\lVert x_i - x_j \rVert^2 / (2\sigma^2))`.

    Raises:
        ValueError: If all representations coincide (zero bandwidth).
    """
    X = _as_matrix(X)
    d2 = torch.cdist(X, X).pow(2)
    if sigma is None:
        n = X.shape[0]
        off = d2[~torch.eye(n, dtype=torch.bool, device=X.device)]
        med = off.sqrt().median()
        sigma = (median_factor * med).item()
        if sigma == 0:
            raise ValueError("all representations coincide; the RBF bandwidth is zero")
    return torch.exp(-d2 / (2.0 * sigma**2))


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    r""":math:`\mathrm{HSIC}(K, L)`: biased, or the unbiased estimator (needs :math:`n \ge 4`).

    Args:
        K: Gram matrix ``(n, n)``.
        L: Gram matrix ``(n, n)``.
        unbiased: Use the unbiased estimator.

    Returns:
        :math:`\mathrm{HSIC}(K, L)`, biased :math:`\operatorname{tr}(KHLH)/(n-1)^2`.

    Raises:
        ValueError: For mismatched shapes, or :math:`n < 4` with ``unbiased``.
    """
    n = K.shape[0]
    if K.shape != (n, n) or L.shape != (n, n):
        raise ValueError("K and L must be square Gram matrices of the same size")
    if not unbiased:
        Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
        return (Kc * L).sum() / (n - 1) ** 2
    if n < 4:
        raise ValueError("the unbiased HSIC needs at least 4 samples")
    Kt = K - torch.diag_embed(K.diagonal())
    Lt = L - torch.diag_embed(L.diagonal())
    one_k, one_l = Kt.sum(1), Lt.sum(1)
    val = ((Kt * Lt).sum() + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2))
           - 2.0 / (n - 2) * (one_k @ one_l))
    return val / (n * (n - 3))


def cka(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> float:
    r""":math:`\mathrm{CKA}` from two Gram matrices.

    .. math::

        \mathrm{CKA}(K, L) = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}}.

    Args:
        K: Gram matrix ``(n, n)``.
        L: Gram matrix ``(n, n)``.
        unbiased: Use the unbiased HSIC.

    Returns:
        :math:`\mathrm{CKA}(K, L)`.

    Raises:
        ValueError: If a representation is constant across samples.
    """
    check_tensor("cka", "K", K, min_dim=2)
    check_tensor("cka", "L", L, min_dim=2)
    kl, kk, ll = hsic(K, L, unbiased), hsic(K, K, unbiased), hsic(L, L, unbiased)
    den = (kk * ll).sqrt()
    if not den > 0:
        raise ValueError("CKA is undefined when a representation is constant across samples")
    return (kl / den).item()


def linear_cka(X: torch.Tensor, Y: torch.Tensor, unbiased: bool = False) -> float:
    r"""Linear :math:`\mathrm{CKA}` of representations :math:`X` (``n×p``) and :math:`Y` (``n×q``); in
    :math:`[0, 1]` when biased.

    Computed in feature space, ``‖Yᶜᵀ Xᶜ‖_F² / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)`` with column-centred
    ``Xᶜ, Yᶜ``, when ``n`` exceeds the widths (same value as the Gram form).

    Args:
        X: Representation ``(n, p)`` (or ``(n, ...)``, flattened).
        Y: Representation ``(n, q)``.
        unbiased: Use the unbiased HSIC.

    Returns:
        Linear :math:`\mathrm{CKA}(X X^\top, Y Y^\top)`.

    Raises:
        ValueError: For different sample counts or a constant representation.
    """
    X, Y = _as_matrix(X, "linear_cka", "X"), _as_matrix(Y, "linear_cka", "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of samples, got {X.shape[0]} "
                         f"and {Y.shape[0]}")
    if unbiased or X.shape[0] <= max(X.shape[1], Y.shape[1]):
        return cka(X @ X.T, Y @ Y.T, unbiased)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    num = (Yc.T @ Xc).pow(2).sum()
    den = (Xc.T @ Xc).norm() * (Yc.T @ Yc).norm()
    if not den > 0:
        raise ValueError("CKA is undefined when a representation is constant across samples")
    return (num / den).item()


def rbf_cka(X: torch.Tensor, Y: torch.Tensor, sigma: float | None = None,
            median_factor: float = 1.0, unbiased: bool = False) -> float:
    r"""RBF-kernel CKA (bandwidth per representation by the median heuristic unless ``sigma``).

    Args:
        X: Representation ``(n, ...)``.
        Y: Representation ``(n, ...)``.
        sigma: Bandwidth :math:`\sigma` for both; default the median heuristic per representation.
        median_factor: Factor on the median distance.
        unbiased: Use the unbiased HSIC.

    Returns:
        RBF-kernel :math:`\mathrm{CKA}`.
    """
    return cka(rbf_kernel(X, sigma, median_factor), rbf_kernel(Y, sigma, median_factor), unbiased)


@torch.no_grad()
def capture_representations(model: nn.Module, X: torch.Tensor,
                            modules: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Outputs of named submodules during ``model(X)``, via forward hooks (detached, flattened).

    Args:
        modules: names from ``model.named_modules()`` (default: every leaf module).
    """
    named = dict(model.named_modules())
    if modules is None:
        modules = [n for n, m in named.items() if n and not list(m.children())]
    missing = [m for m in modules if m not in named]
    if missing:
        raise ValueError(f"unknown module names {missing}; see model.named_modules()")
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        def hook(_mod, _inp, output, name=name):
            if isinstance(output, (tuple, list)):
                output = output[0]
            out[name] = output.detach().reshape(output.shape[0], -1)
        handles.append(named[name].register_forward_hook(hook))
    try:
        model(X)
    finally:
        for h in handles:
            h.remove()
    return {m: out[m] for m in modules if m in out}


@torch.no_grad()
def revmlp_representations(model, X: torch.Tensor, per: str = "half_layer"
                           ) -> dict[str, torch.Tensor]:
    r"""RevMLP representations ``[X1, X2]`` after each coupling half-layer or each block.

    ``per="half_layer"``: ``blocks.l.f`` → ``[Y1, X2]`` and ``blocks.l.g`` → ``[Y1, Y2]``;
    ``per="block"``: ``blocks.l`` → ``X^(l)``. Entry ``"input"`` is the flattened input.

    Args:
        model: A :class:`~gnrev_plugin.nn.RevMLP`.
        X: Inputs.
        per: ``"half_layer"`` or ``"block"``.

    Returns:
        Name :math:`\to` ``(n, d)`` representation.

    Raises:
        ValueError: For an unknown ``per``.
    """
    if per not in ("half_layer", "block"):
        raise ValueError("per must be 'half_layer' or 'block'")
    z = model.flatten_input(X)
    reps = {"input": z.clone()}
    for l, block in enumerate(model.blocks):
        x1, x2 = block.split(z)
        y1 = x1 + block.f(x2)
        if per == "half_layer":
            reps[f"blocks.{l}.f"] = torch.cat([y1, x2], -1)
        y2 = x2 + block.g(y1)
        z = torch.cat([y1, y2], -1)
        reps[f"blocks.{l}.g" if per == "half_layer" else f"blocks.{l}"] = z
    return reps


def cka_by_layer(reps_a: dict[str, torch.Tensor], reps_b: dict[str, torch.Tensor],
                 kernel: str = "linear", unbiased: bool = False) -> dict[str, float]:
    r"""CKA between matching entries of two representation dicts (e.g. init vs trained).

    Args:
        reps_a: Name :math:`\to` representation.
        reps_b: Name :math:`\to` representation (the common names are compared).
        kernel: ``"linear"`` or ``"rbf"``.
        unbiased: Use the unbiased HSIC.

    Returns:
        Name :math:`\to` :math:`\mathrm{CKA}`.

    Raises:
        ValueError: For an unknown ``kernel``.
    """
    fn = {"linear": linear_cka, "rbf": rbf_cka}.get(kernel)
    if fn is None:
        raise ValueError("kernel must be 'linear' or 'rbf'")
    return {k: fn(reps_a[k], reps_b[k], unbiased=unbiased) for k in reps_a if k in reps_b}
