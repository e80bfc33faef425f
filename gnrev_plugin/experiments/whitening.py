"""PCA-whitened inputs for the conditioning and NME experiments."""

from __future__ import annotations

import torch

from gnrev_plugin.build import load_data

__all__ = ["pca_whiten", "whitened_inputs"]


def pca_whiten(X: torch.Tensor, dim: int, whiten: bool = True) -> torch.Tensor:
    """Project ``X`` (``n × D``) on its top-``dim`` principal directions of the **uncentred**
    second moment ``Σ = XᵀX/n = V Λ Vᵀ`` and, if ``whiten``, rescale to ``Σ_w = I_dim``:
    ``X_w = X V_dim Λ_dim^{-1/2}`` (float64). Without ``whiten`` the projection is rescaled to
    unit average variance."""
    X = X.double()
    n = X.shape[0]
    if dim > min(X.shape):
        raise ValueError(f"cannot keep {dim} components of a {tuple(X.shape)} data matrix")
    lam, V = torch.linalg.eigh(X.T @ X / n)
    lam, V = lam.flip(0)[:dim], V.flip(1)[:, :dim]
    if not lam[-1] > 0:
        raise ValueError(f"the data has rank < {dim}; choose a smaller input_dim")
    Z = X @ V
    return Z / lam.sqrt() if whiten else Z / lam.mean().sqrt()


def whitened_inputs(data: str, data_dir: str | None, num_samples: int, dim: int,
                    whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """The first ``num_samples`` training images of ``data`` reduced to ``dim`` PCA components
    (whitened on those samples), loaded through the registry (``data`` is a registered dataset
    name; the ``gnrev.`` prefix is optional). Returns ``(X, y, num_classes, description)``."""
    ds = load_data(data, {} if data_dir is None else {"data_dir": str(data_dir)})
    if num_samples > len(ds.y_train):
        raise ValueError(f"{data} has only {len(ds.y_train)} training samples, "
                         f"{num_samples} requested")
    dim = min(dim, ds.in_features)  # e.g. MNIST-1D has only 40 features
    X = pca_whiten(ds.x_train[:num_samples], dim, whiten)
    desc = (f"{ds.describe()}; first {num_samples} training samples, top {dim} PCA components"
            f"{', whitened (XᵀX/n = I)' if whiten else ''}")
    return X, ds.y_train[:num_samples], ds.num_classes, desc
