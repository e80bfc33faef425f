"""The Gram ``J_ℓ J_ℓᵀ`` of one layer from its Jacobian in factored form, never forming ``J_ℓ``.

Linear, convolution and norm-affine layers share one structure. Sample ``i``'s layer input gives
*patch vectors* ``a_{i,g,p} ∈ R^d`` (group ``g``, position ``p``; a trained bias appends a ``1``)
and the output-VJPs of output coordinate ``c`` give ``g_{i,c,g,p} ∈ R^m`` (``m`` output channels
per group), so the row ``(i, c)`` of ``J_ℓ`` is, per group, the per-sample gradient

.. math::

    \\Gamma_{ic,g} = \\sum_p g_{i,c,g,p}\\, a_{i,g,p}^\\top \\in \\mathbb{R}^{m\\times d},
    \\qquad
    K_{(i,c),(j,c')} = \\sum_g \\sum_{p,q}
        \\langle a_{i,g,p}, a_{j,g,q}\\rangle\\,\\langle g_{i,c,g,p}, g_{j,c',g,q}\\rangle .

Two ways to evaluate ``K`` (``nC × nC``), chosen from the shapes by :func:`choose_strategy`:

* ``"per_sample_grad"``: form ``Γ`` (``nC × G·m·d``) in sample chunks and take ``Γ Γᵀ``;
  ``nC·G·m·T·d + (nC)²·G·m·d`` multiply-adds.
* ``"patch_gram"``: for each group and position pair, ``(A_{gpq} ⊗ 1_{C×C}) ⊙ (G_{gp} G_{gq}ᵀ)``
  with ``A_{gpq} = [⟨a_{i,g,p}, a_{j,g,q}⟩]_{ij}``; ``G·T²·(nC)²·(m + 3)`` multiply-adds, no
  per-sample gradients (for ``T = 1``, an ``nn.Linear``, this is ``(AAᵀ + 1) ⊙ GGᵀ``).

Tensors: ``a`` is ``(n, G, T, d)``, ``g`` is ``(n, C, G, m, T)``; rows of ``K`` are sample-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LayerFactors", "choose_strategy", "factored_gram", "factored_diagonal",
           "factored_sample_blocks", "STRATEGIES"]

STRATEGIES = ("per_sample_grad", "patch_gram")


@dataclass
class LayerFactors:
    """One layer's rows of ``J`` in factored form (module docstring).

    Attributes:
        a: patch vectors, ``(n, G, T, d)``.
        g: output-VJPs, ``(n, C, G, m, T)``.
    """

    a: torch.Tensor
    g: torch.Tensor

    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(n, C, G, T, d, m)``."""
        n, G, T, d = self.a.shape
        return n, self.g.shape[1], G, T, d, self.g.shape[3]


def _costs(n: int, C: int, G: int, T: int, d: int, m: int) -> dict[str, float]:
    nC = float(n * C)
    return {"per_sample_grad": nC * G * m * T * d + nC * nC * G * m * d,
            "patch_gram": G * T * T * nC * nC * (m + 3) + n * n * G * T * T * d}


def choose_strategy(factors: LayerFactors) -> str:
    """The cheaper of ``"per_sample_grad"`` and ``"patch_gram"`` by multiply-add count (module
    docstring).

    Args:
        factors: the layer's factored rows.

    Returns:
        The strategy's name.
    """
    costs = _costs(*factors.shape())
    return min(STRATEGIES, key=costs.__getitem__)


def _chunk_samples(n: int, row_bytes: int, budget_bytes: int, parts: int = 2) -> int:
    """Samples per chunk so that ``parts`` chunks of ``row_bytes`` each stay under the budget."""
    return max(1, min(n, budget_bytes // max(1, parts * row_bytes)))


def _per_sample_grads(f: LayerFactors, lo: int, hi: int) -> torch.Tensor:
    """``Γ`` for samples ``lo:hi``: ``((hi − lo)·C, G·m·d)``."""
    grads = torch.einsum("icgmp,igpd->icgmd", f.g[lo:hi], f.a[lo:hi])
    return grads.reshape(grads.shape[0] * grads.shape[1], -1)


def _gram_per_sample(f: LayerFactors, budget_bytes: int, blocks: int = 4) -> torch.Tensor:
    """``Γ Γᵀ`` by sample blocks, upper blocks only (mirrored): ``Γ`` whole when it fits the
    budget, else recomputed per block pair."""
    n, C, G, T, d, m = f.shape()
    row_bytes = C * G * m * d * f.a.element_size()
    whole = n * row_bytes <= budget_bytes
    step = -(-n // blocks) if whole else _chunk_samples(n, row_bytes, budget_bytes)
    grads = _per_sample_grads(f, 0, n) if whole else None

    def rows(lo: int, hi: int) -> torch.Tensor:
        return grads[lo * C:hi * C] if whole else _per_sample_grads(f, lo, hi)

    K = f.a.new_empty(n * C, n * C)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        left = rows(lo, hi)
        for lo2 in range(lo, n, step):
            hi2 = min(n, lo2 + step)
            block = left @ (left if lo2 == lo else rows(lo2, hi2)).mT
            K[lo * C:hi * C, lo2 * C:hi2 * C] = block
            if lo2 != lo:
                K[lo2 * C:hi2 * C, lo * C:hi * C] = block.mT
    return K


def _gram_patches(f: LayerFactors) -> torch.Tensor:
    n, C, G, T, _, _ = f.shape()
    K = f.a.new_zeros(n * C, n * C)
    for grp in range(G):
        for p in range(T):
            gp = f.g[:, :, grp, :, p].reshape(n * C, -1)
            for q in range(p, T):
                A = f.a[:, grp, p] @ f.a[:, grp, q].mT
                gq = gp if q == p else f.g[:, :, grp, :, q].reshape(n * C, -1)
                term = A.repeat_interleave(C, 0).repeat_interleave(C, 1) * (gp @ gq.mT)
                K += term if q == p else term + term.mT
    return K


def factored_gram(factors: LayerFactors, strategy: str | None = None,
                  max_memory_mb: float = 1024.0) -> tuple[torch.Tensor, str]:
    """``K = J_ℓ J_ℓᵀ`` (``nC × nC``) from the layer's factors.

    .. math::

        K_{(i,c),(j,c')} = \\sum_g \\sum_{p,q}
            \\langle a_{i,g,p}, a_{j,g,q}\\rangle\\,\\langle g_{i,c,g,p}, g_{j,c',g,q}\\rangle

    Args:
        factors: the layer's factored rows.
        strategy: ``"per_sample_grad"``, ``"patch_gram"`` or ``None`` (:func:`choose_strategy`).
        max_memory_mb: bound on the per-sample gradients held at once (two sample chunks).

    Returns:
        ``(K, strategy used)``.
    """
    strategy = strategy or choose_strategy(factors)
    if strategy == "per_sample_grad":
        return _gram_per_sample(factors, int(max_memory_mb * 2**20)), strategy
    if strategy == "patch_gram":
        return _gram_patches(factors), strategy
    raise ValueError(f"unknown Gram strategy {strategy!r}; choose from {STRATEGIES}")


def factored_diagonal(factors: LayerFactors, strategy: str | None = None,
                      max_memory_mb: float = 1024.0) -> torch.Tensor:
    """``diag(J_ℓ J_ℓᵀ)`` (``nC``): ``‖Γ_{ic}‖²`` without the off-diagonal blocks.

    .. math::

        K_{(i,c),(i,c)} = \\sum_g \\sum_{p,q}
            \\langle a_{i,g,p}, a_{i,g,q}\\rangle\\,\\langle g_{i,c,g,p}, g_{i,c,g,q}\\rangle

    Args:
        factors: the layer's factored rows.
        strategy: as in :func:`factored_gram`.
        max_memory_mb: bound on the per-sample gradients held at once.

    Returns:
        The diagonal, sample-major.
    """
    strategy = strategy or choose_strategy(factors)
    n, C, G, T, d, m = factors.shape()
    if strategy == "per_sample_grad":
        step = _chunk_samples(n, C * G * m * d * factors.a.element_size(),
                              int(max_memory_mb * 2**20), parts=1)
        return torch.cat([_per_sample_grads(factors, lo, min(n, lo + step)).square().sum(1)
                          for lo in range(0, n, step)])
    aa = torch.einsum("igpd,igqd->igpq", factors.a, factors.a)
    return torch.einsum("icgmp,igpq,icgmq->ic", factors.g, aa, factors.g).reshape(n * C)


def factored_sample_blocks(factors: LayerFactors, strategy: str | None = None,
                           max_memory_mb: float = 1024.0) -> torch.Tensor:
    """The per-sample ``C × C`` diagonal blocks of ``J_ℓ J_ℓᵀ``: ``(n, C, C)``.

    .. math::

        K_{(i,c),(i,c')} = \\sum_g \\sum_{p,q}
            \\langle a_{i,g,p}, a_{i,g,q}\\rangle\\,\\langle g_{i,c,g,p}, g_{i,c',g,q}\\rangle

    Args:
        factors: the layer's factored rows.
        strategy: as in :func:`factored_gram`.
        max_memory_mb: bound on the per-sample gradients held at once.

    Returns:
        The blocks, one per sample.
    """
    strategy = strategy or choose_strategy(factors)
    n, C, G, T, d, m = factors.shape()
    if strategy == "per_sample_grad":
        step = _chunk_samples(n, C * G * m * d * factors.a.element_size(),
                              int(max_memory_mb * 2**20), parts=1)
        out = []
        for lo in range(0, n, step):
            grads = _per_sample_grads(factors, lo, min(n, lo + step)).reshape(-1, C, G * m * d)
            out.append(grads @ grads.mT)
        return torch.cat(out)
    aa = torch.einsum("igpd,igqd->igpq", factors.a, factors.a)
    return torch.einsum("icgmp,igpq,iegmq->ice", factors.g, aa, factors.g)
