"""Dense float64 oracles shared by the core tests (torch.func Jacobians, pseudo-inverses)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev


def dense_jacobian(model: nn.Module, x: torch.Tensor, params: list[str] | None = None) -> torch.Tensor:
    """``J = ∂ vec model(x) / ∂θ`` (rows sample-major, columns in ``named_parameters`` order)."""
    named = dict(model.named_parameters())
    names = params or list(named)
    base = {n: p.detach() for n, p in named.items()}

    def f(trained):
        return functional_call(model, {**base, **trained}, (x,))

    trained = {n: base[n] for n in names}
    out = f(trained)
    jac = jacrev(f)(trained)
    return torch.cat([jac[n].reshape(out.numel(), -1) for n in names], dim=1)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bitwise_equal(model: nn.Module, snap: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), snap, strict=True))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ cross-entropy Newton targets
#: H's null eigenvalue comes out as ±1e-17 in floating point, which pinv's default cut
#: (2·eps·λ_max) can keep (C=2, seed 2 of tests/optim/test_targets_oracle.py: error 0.99). Eigenvalues of
#: diag(p) − ppᵀ interlace the p_k, so for logits in [−3, 3] the nonzero ones are ≥ ~1e-4·λ_max: a
#: 1e-8 cut separates them from the null one.
PINV_RTOL = 1e-8


def np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def oracle_probs(y, C: int, smoothing: float) -> np.ndarray:
    """Targets as probabilities: one-hot rows from class indices, smoothed as (1−s)y + s/C."""
    y = y.numpy()
    if y.ndim == 1:
        Y = np.zeros((len(y), C))
        Y[np.arange(len(y)), y] = 1.0
    else:
        Y = y.astype(np.float64)
    return (1.0 - smoothing) * Y + smoothing / C


def oracle_ce_target(F_, y, kind: str, lam: float = 1e-3, smoothing: float = 0.0) -> torch.Tensor:
    """Per sample, never calling the package: NumPy softmax ``p``, ``g = p − y``,
    ``H = diag(p) − ppᵀ``; ``identity``: ``g``; ``pinv``: ``pinv(H) g``; ``damped``:
    ``solve(H + λI, g)``. ``F_`` float64 ``(n, C)``, ``y`` class indices or probabilities."""
    Fn = F_.numpy()
    Y = oracle_probs(y, Fn.shape[1], smoothing)
    rows = []
    for f, yi in zip(Fn, Y, strict=True):
        p = torch.tensor(np_softmax(f), dtype=torch.float64)
        g = p - torch.tensor(yi, dtype=torch.float64)
        H = torch.diag(p) - torch.outer(p, p)
        if kind == "identity":
            rows.append(g)
        elif kind == "pinv":
            rows.append(torch.linalg.pinv(H, rtol=PINV_RTOL, hermitian=True) @ g)
        elif kind == "damped":
            rows.append(torch.linalg.solve(H + lam * torch.eye(len(p), dtype=torch.float64), g))
        else:
            raise AssertionError(kind)
    return torch.stack(rows)


def tanh_mlp_problem(n: int, loss: str, d: int, h: int, C: int, seed: int = 0):
    """A float64 ``d → h → C`` tanh MLP with N(0, 1) weights, ``n`` inputs and targets (class
    indices for cross-entropy, Gaussian outputs for MSE), all from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.randint(0, C, (n,), generator=g) if loss == "cross_entropy"
         else torch.randn(n, C, generator=g, dtype=torch.float64))
    return model, x, y
