"""Dense float64 oracles shared by the core tests (torch.func Jacobians, pseudo-inverses)."""

from __future__ import annotations

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
