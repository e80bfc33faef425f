"""The dual and primal Grams of ``B = [S, 1]``, formed on their lower (block) triangle."""

from __future__ import annotations

import torch

__all__ = ["gram_with_ones", "primal_gram_with_ones"]


def gram_with_ones(S: torch.Tensor, block_rows: int = 256) -> torch.Tensor:
    r""":math:`K = S S^\top + \mathbf{1}\mathbf{1}^\top` (the dual Gram of :math:`B = [S, \mathbf{1}]`),
    exactly symmetric.

    For ``n ≥ 2·block_rows`` only the lower block triangle is multiplied (row block ``i`` against
    rows ``0..i`` in one product) and mirrored: about ``(b+1)/(2b)`` of the FLOPs of ``S Sᵀ`` for
    ``b`` row blocks, in large, efficient matrix products.

    Args:
        S: Features :math:`S`, ``(n, M)``.
        block_rows: Row block size.

    Returns:
        :math:`K = S S^\top + \mathbf{1}\mathbf{1}^\top`, ``(n, n)``.
    """
    K = _lower_block_products(S, block_rows)
    K = torch.tril(K) + torch.tril(K, -1).mT
    return K.add_(1.0)


def _lower_block_products(S: torch.Tensor, block_rows: int) -> torch.Tensor:
    """``S Sᵀ`` with only its lower triangle guaranteed: one product for ``n < 2·block_rows``,
    else row block ``i`` against rows ``0..i``."""
    n = S.shape[0]
    if n < 2 * block_rows:
        return S @ S.mT
    K = torch.empty(n, n, dtype=S.dtype, device=S.device)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        K[start:stop, :stop] = S[start:stop] @ S[:stop].mT
    return K


def _dual_gram_lower(S: torch.Tensor, dtype: torch.dtype, block_rows: int = 256) -> torch.Tensor:
    """``K = S Sᵀ + 1 1ᵀ`` in ``dtype`` with only the **lower** triangle guaranteed (what Cholesky
    reads; :class:`GramSystem` mirrors it on the rare paths that need the full matrix). Same lower
    block triangle products as :func:`gram_with_ones`, without the mirroring passes; the ``+1`` is
    added after the conversion, exactly."""
    return _lower_block_products(S, block_rows).to(dtype).add_(1.0)


def primal_gram_with_ones(S: torch.Tensor, dtype: torch.dtype | None = None,
                          block_cols: int = 128) -> torch.Tensor:
    r"""``G = BᵀB = [[SᵀS, Sᵀ1], [1ᵀS, n]]`` (the primal Gram of ``B = [S, 1]``) in ``dtype``.

    Only the **lower** triangle of ``SᵀS`` is formed (column block ``i`` against columns
    ``0..i``, about ``(b+1)/(2b)`` of the FLOPs for ``b`` blocks) and guaranteed; the last row
    and column are complete. Cholesky reads nothing else (see :class:`GramSystem`).

    Args:
        S: Features :math:`S`, ``(n, M)``.
        dtype: Dtype of the result (default ``S.dtype``).
        block_cols: Column block size.

    Returns:
        :math:`G = B^\top B`, ``(M + 1, M + 1)``, lower triangle valid.
    """
    n, m = S.shape
    G = torch.empty(m + 1, m + 1, dtype=S.dtype, device=S.device)
    if m < 2 * block_cols:
        G[:m, :m] = S.mT @ S
    else:
        for start in range(0, m, block_cols):
            stop = min(start + block_cols, m)
            G[start:stop, :stop] = S[:, start:stop].mT @ S[:, :stop]
    col = S.sum(0)
    G[m, :m] = col
    G[:m, m] = col
    G[m, m] = n
    return G if dtype is None else G.to(dtype)


def _with_ones_t(core: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[coreᵀ Λ; 1ᵀ Λ]`` as ``(Λᵀ core, Λᵀ 1)``."""
    return lam.mT @ core, lam.sum(0)

