r"""``DiagHessian`` on a coupling block: the :math:`\sigma''` residuals and exact factor compression.

``DiagHessian``/``BatchDiagHessian`` backpropagate BackPACK's signed lists of square-root factors
of the per-sample loss Hessian

.. math::

    H_n = \sum_i \varepsilon_i\, S_i[:, n]^\top S_i[:, n], \qquad \varepsilon_i \in \{+1, -1\}.

The block is linear in each single parameter, so
:math:`\partial^2 L / \partial W_{ab}^2 = \sum_n s_n[b]^2 (H_{u,n})_{aa}` needs the Hessian
:math:`H_u` in each inner output :math:`u`; it is the pulled-back output Hessian plus, for every
half-layer :math:`h = Z C` after :math:`u` with :math:`\sigma'' \neq 0`, the residual
:math:`C \operatorname{diag}(\sigma''(h) \odot \partial L/\partial s)\, C^\top` in that
half-layer's input :math:`Z` (:math:`\partial L/\partial s = (\partial L/\partial u) W`). For a
block: the :math:`g` residual sits at :math:`Y_1` (it enters :math:`H_{u_f}` and the block input),
the :math:`f` residual at :math:`X_2` (block input only). Each residual is added as two factors
:math:`\sqrt{(\pm r)_+} \odot C` (``[M, N, d/2]``, signs :math:`\pm 1`), and a list with more
columns than twice the feature width is compressed exactly, per sample, to
:math:`H_n = L_n L_n^\top - c_n I` (:func:`compress`; ``docs/hosts/backpack.md`` has the
derivation). With :math:`\sigma'' = 0` (ReLU, identity) there is no residual, and
``DiagHessian − DiagGGNExact`` is exactly the diagonal of the NME,
:math:`\operatorname{diag}(H - G)`, carried by the :math:`\sigma''` terms.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vmap

from ...nn.coupling import CouplingFunction

#: Activations with ``σ'' = 0`` (almost everywhere): no second-derivative residual.
_ZERO_CURVATURE_ACTIVATIONS = ("relu", "identity")


def second_derivative(fn: CouplingFunction, h: Tensor) -> Tensor | None:
    r"""The activation's second derivative :math:`\sigma''(h)`, elementwise, by ``torch.func``.

    ``grad`` of ``grad`` of :math:`\sigma` on every scalar. Differentiating the forward
    :math:`\sigma` itself (not its stored :math:`\sigma'`) keeps the result the exact second
    derivative of what the block computes (e.g. softplus's linear branch above its threshold has
    :math:`\sigma'' = 0`).

    Args:
        fn: The half-layer whose activation :math:`\sigma` is differentiated.
        h: Pre-activations :math:`h = Z C`.

    Returns:
        :math:`\sigma''(h)`, shaped like ``h``; ``None`` when :math:`\sigma'' = 0` (ReLU, identity).
    """
    act = fn.activation
    if act.is_linear or act.name in _ZERO_CURVATURE_ACTIVATIONS:
        return None
    flat = h.reshape(-1)
    return vmap(grad(grad(lambda t: act(t))))(flat).reshape(h.shape)


def residual_factors(fn: CouplingFunction, z: Tensor, grad_u: Tensor) -> list[tuple[Tensor, float]]:
    r"""Signed square-root factors of the half-layer's second-derivative term in its input :math:`Z`.

    For :math:`u = \sigma(Z C) W^\top + b` and the loss gradient
    :math:`\gamma = \partial L / \partial u` (``[N, d/2]``), the term is, per sample :math:`n`,

    .. math::

        R_n = \sum_a \gamma_{n,a} \nabla^2_Z u_{n,a} = C \operatorname{diag}(r_n) C^\top,
        \qquad r_n = \sigma''(h_n) \odot (\gamma_n W),

    with :math:`h = Z C` and :math:`\gamma W = \partial L / \partial s`. With
    :math:`P[m, n] = \sqrt{\max(r_{n,m}, 0)}\, C[:, m]` and
    :math:`Q[m, n] = \sqrt{\max(-r_{n,m}, 0)}\, C[:, m]` (``[M, N, d/2]``),
    :math:`R_n = P[:, n]^\top P[:, n] - Q[:, n]^\top Q[:, n]`.

    Args:
        fn: The half-layer (:math:`C`, :math:`W`, :math:`\sigma`).
        z: Its input :math:`Z`, ``[N, d/2]``.
        grad_u: :math:`\gamma = \partial L / \partial u`, ``[N, d/2]``.

    Returns:
        ``[(P, +1), (Q, -1)]``; ``[]`` when :math:`\sigma'' = 0`.
    """
    C = fn.projection
    s2 = second_derivative(fn, z @ C)
    if s2 is None:
        return []
    r = s2 * (grad_u @ fn.linear.weight.detach())                     # [N, M]
    return [(torch.einsum("nm,jm->mnj", (sign * r).clamp(min=0).sqrt(), C), sign)
            for sign in (1.0, -1.0)]


def _dense_per_sample(bp: dict) -> Tensor:
    """``H_n = Σ_i ε_i S_i[:, n]ᵀ S_i[:, n]`` for all ``n``: ``[N, w, w]``."""
    mats = [m.flatten(2) for m in bp["matrices"]]
    return sum(sign * torch.einsum("kni,knj->nij", m, m)
               for m, sign in zip(mats, bp["signs"], strict=True))


def compress(bp: dict) -> dict:
    r"""The same per-sample Hessians :math:`H_n` with at most twice the feature width :math:`w` columns.

    When the lists hold more than :math:`2w` columns in all,
    :math:`H_n = \sum_i \varepsilon_i S_i^\top S_i` is formed (``[N, w, w]``) and refactored
    exactly as

    .. math::

        H_n = L_n L_n^\top - c_n I, \qquad
        c_n = 1.001 \max_i \sum_j \lvert H_{n,ij} \rvert \;\ge\; -\lambda_{\min}(H_n)

    (the Gershgorin bound; :math:`c_n = 1` for :math:`H_n = 0`), so :math:`H_n + c_n I` is
    positive definite and :math:`L_n` its Cholesky factor. Rounding: :math:`O(\epsilon c_n)` per
    entry, like an eigendecomposition's :math:`O(\epsilon \lVert H_n \rVert)`, at a fraction of its
    cost (a batched ``eigh`` is ~50× slower here).

    Args:
        bp: ``{"matrices": [S_i], "signs": [ε_i]}``, each :math:`S_i` ``[K_i, N, *features]``.

    Returns:
        ``{"matrices": [L_nᵀ, √c_n I], "signs": [+1, -1]}`` (``[w, N, *features]`` each), or
        ``bp`` unchanged when it has at most :math:`2w` columns.
    """
    mats = bp["matrices"]
    if not mats:
        return bp
    shape = mats[0].shape[1:]                                          # (N, *features)
    width = mats[0][0, 0].numel()
    if sum(m.shape[0] for m in mats) <= 2 * width:
        return bp
    H = _dense_per_sample(bp)
    H = 0.5 * (H + H.mT)                                               # [N, w, w]
    bound = H.abs().sum(-1).amax(-1)                                   # ≥ −λ_min(H_n)
    c = torch.where(bound > 0, bound * 1.001, torch.ones_like(bound))
    eye = torch.eye(width, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H + c[:, None, None] * eye)
    if bool((info != 0).any()):  # not expected (H + cI ≥ 0.001·c·I); fall back to eigh
        lam, Q = torch.linalg.eigh(H)
        out = [torch.einsum("nik,nk->kni", Q, (sign * lam).clamp(min=0).sqrt())
               for sign in (1.0, -1.0)]
    else:
        out = [L.permute(2, 0, 1),                                     # S[k, n, i] = L[n, i, k]
               eye[:, None, :] * c.sqrt()[None, :, None]]
    return {"matrices": [m.reshape(width, *shape) for m in out], "signs": [1.0, -1.0]}
