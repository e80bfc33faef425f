"""gnrev's pytest plugin (entry point ``pytest11: gnrev``): fixtures, dense oracles, contract checks.

Installed with gnrev-plugin, it is loaded by every pytest run (unless
``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` is set; then use ``-p gnrev_plugin.pytest_plugin``). A
third-party package can test its own optimizers and models against gnrev's contracts::

    def test_my_optimizer_is_exact_gn(gnrev_tiny_revmlp, gnrev_small_data, gnrev_contracts):
        X, y_mse, _ = gnrev_small_data
        gnrev_contracts.check_exact_gn_update(
            lambda params, model: MyGN(params, lr=0.5), gnrev_tiny_revmlp, X, y_mse,
            loss="mse", lr=0.5)

    def test_my_flow_is_invertible(gnrev_small_data, gnrev_contracts):
        gnrev_contracts.check_exactly_invertible(MyFlow(6).double(), gnrev_small_data[0])

Contracts (plain functions, also importable from this module):

* :func:`check_exact_gn_update` — one optimizer step ``Δθ`` on a batch satisfies
  ``J Δθ = −α ε`` (the linearised output change of an exact Gauss-Newton step with step size
  ``α``; ``ε = F − Y`` for MSE, ``softmax(F) − onehot(y)`` for cross-entropy), with ``J`` the dense
  ``torch.func`` Jacobian; optionally also that ``Δθ`` is the minimum-norm such step
  ``−α J⁺ ε``.
* :func:`check_exactly_invertible` — ``inverse(forward(X)) = X`` and
  ``forward(inverse(Z)) = Z`` to float64 round-off.

Fixtures: ``gnrev_tiny_revmlp`` (a float64 :class:`~gnrev_plugin.nn.RevMLP`, 6 → 3, two tanh
blocks), ``gnrev_small_data`` (``X`` (5, 6), MSE targets (5, 3), class labels (5,)),
``gnrev_dense_oracles`` (:class:`DenseOracles`) and ``gnrev_contracts`` (this module's checks).
torch is imported lazily, so the plugin costs nothing to pytest runs that do not use it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import pytest

__all__ = ["DenseOracles", "check_exact_gn_update", "check_exactly_invertible",
           "output_residual", "ContractViolation"]


class ContractViolation(AssertionError):
    """A contract check failed; the message says which quantity and by how much."""


def output_residual(F, y, loss: str):
    """``ε``: ``F − Y`` (MSE) or ``softmax(F) − onehot(y)`` (cross-entropy, ``y`` class indices)."""
    import torch

    if loss == "mse":
        return F - y
    if loss in ("cross_entropy", "ce"):
        return torch.softmax(F, dim=-1) - torch.nn.functional.one_hot(y, F.shape[-1]).to(F.dtype)
    raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")


class DenseOracles:
    """Dense float64 reference quantities from ``torch.func`` (small models only).

    Parameters are ordered as ``model.parameters()`` and flattened; output rows are
    sample-major (``model(X).flatten()``).
    """

    @staticmethod
    def _functional(model):
        from torch.func import functional_call

        names = [n for n, _ in model.named_parameters()]
        params = tuple(p.detach() for p in model.parameters())
        return (lambda ps, x: functional_call(model, dict(zip(names, ps, strict=True)), (x,))), \
            params

    @classmethod
    def jacobian(cls, model, X):
        """``J = ∂F/∂θ`` (``N·C × P``)."""
        import torch
        from torch.func import jacrev

        f, params = cls._functional(model)
        jac = jacrev(lambda ps: f(ps, X).flatten())(params)
        return torch.cat([j.flatten(1) for j in jac], dim=1)

    @classmethod
    def loss_output_hessian(cls, model, loss_fn, X, y):
        """``∇²_F L`` (``N·C × N·C``)."""
        import torch
        from torch.func import hessian

        with torch.no_grad():
            out = model(X)
        return hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.flatten())

    @classmethod
    def ggn(cls, model, loss_fn, X, y):
        """``G = Jᵀ ∇²_F L J``."""
        J = cls.jacobian(model, X)
        return J.T @ cls.loss_output_hessian(model, loss_fn, X, y) @ J

    @classmethod
    def hessian(cls, model, loss_fn, X, y):
        """``H = ∇²_θ L`` (``P × P``)."""
        import torch
        from torch.func import hessian

        f, params = cls._functional(model)
        sizes = [p.numel() for p in params]

        def flat_loss(theta):
            ps = [t.reshape(p.shape) for t, p in zip(theta.split(sizes), params, strict=True)]
            return loss_fn(f(ps, X), y)
        return hessian(flat_loss)(torch.cat([p.flatten() for p in params]))

    @classmethod
    def min_norm_gn_step(cls, model, X, y, loss: str, lr: float):
        """The minimum-norm exact GN step ``Δθ = −α J⁺ ε`` (flat)."""
        import torch

        with torch.no_grad():
            eps = output_residual(model(X), y, loss)
        return -lr * torch.linalg.pinv(cls.jacobian(model, X)) @ eps.flatten()


def _flat_params(model):
    import torch

    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _default_step(loss: str) -> Callable:
    def step(opt, model, X, y):
        import torch

        crit = torch.nn.MSELoss() if loss == "mse" else torch.nn.CrossEntropyLoss()
        opt.zero_grad()
        crit(model(X), y).backward()
        opt.step()
    return step


def check_exact_gn_update(
    make_optimizer: Callable[[Sequence, Any], Any],
    model,
    X,
    y,
    *,
    loss: str = "mse",
    lr: float = 1.0,
    step: Callable | None = None,
    rtol: float = 1e-8,
    min_norm: bool = False,
) -> dict:
    """Check that one step of the optimizer is an exact Gauss-Newton step on ``(X, y)``.

    Args:
        make_optimizer: ``make_optimizer(params, model) -> optimizer`` (built on ``model``).
        model: the model (float64 recommended); it is updated in place by the step.
        X, y: the batch; ``y`` are MSE targets shaped like ``model(X)`` or class indices.
        loss: ``"mse"`` or ``"cross_entropy"``.
        lr: the step size ``α`` the optimizer was configured with.
        step: ``step(opt, model, X, y)`` performing one update; default: the drop-in loop
            ``zero_grad(); criterion(model(X), y).backward(); step()``.
        rtol: tolerance relative to ``max(1, ‖α ε‖)``.
        min_norm: also require ``Δθ = −α J⁺ ε`` (e.g. for a dense/pseudo-inverse GN).

    Returns:
        ``{"residual": ‖J Δθ + α ε‖, "target_norm": ‖α ε‖, "min_norm_error": ...}``.

    Raises:
        ContractViolation: if the linearised output change is not ``−α ε``.
    """
    import torch

    J = DenseOracles.jacobian(model, X)
    with torch.no_grad():
        eps = output_residual(model(X), y, loss).flatten()
    ref = DenseOracles.min_norm_gn_step(model, X, y, loss, lr) if min_norm else None
    before = _flat_params(model)
    opt = make_optimizer(model.parameters(), model)
    (step or _default_step(loss))(opt, model, X, y)
    delta = _flat_params(model) - before
    target = -lr * eps
    scale = max(1.0, float(target.norm()))
    residual = float((J @ delta - target).norm())
    report = {"residual": residual, "target_norm": float(target.norm()), "min_norm_error": None}
    if not torch.isfinite(delta).all():
        raise ContractViolation(f"{type(opt).__name__}: the update has non-finite entries")
    if residual > rtol * scale:
        raise ContractViolation(
            f"{type(opt).__name__} is not an exact Gauss-Newton step on this batch: "
            f"‖J Δθ + α ε‖ = {residual:.3e} > {rtol:.1e} · {scale:.3e} (α = {lr}, loss={loss!r})")
    if ref is not None:
        err = float((delta - ref).norm())
        report["min_norm_error"] = err
        if err > rtol * max(1.0, float(ref.norm())):
            raise ContractViolation(
                f"{type(opt).__name__} is an exact GN step but not the minimum-norm one "
                f"−α J⁺ ε: ‖Δθ − Δθ*‖ = {err:.3e}")
    return report


def check_exactly_invertible(model, X, *, forward: Callable | None = None,
                             inverse: Callable | None = None, rtol: float = 1e-10) -> dict:
    """Check ``inverse(forward(X)) = X`` and ``forward(inverse(Z)) = Z`` (``Z = forward(X)``).

    ``forward`` defaults to ``model.features`` if the model has it (a RevMLP's invertible part,
    before the readout), else ``model``; ``inverse`` to ``model.inverse``. Inputs are compared
    flattened per sample. Tolerance: ``rtol · max(1, ‖X‖_max)``.

    Raises:
        ContractViolation: naming the direction and the error.
    """
    import torch

    fwd = forward or getattr(model, "features", None) or model
    inv = inverse or getattr(model, "inverse", None)
    if inv is None:
        raise ContractViolation(f"{type(model).__name__} has no inverse() to check")
    with torch.no_grad():
        Z = fwd(X)
        X_rec = inv(Z)
        Z_rec = fwd(X_rec.reshape(X.shape))
    x = X.reshape(X.shape[0], -1)
    err_x = float((X_rec.reshape(x.shape) - x).abs().max())
    err_z = float((Z_rec - Z).abs().max())
    tol_x = rtol * max(1.0, float(x.abs().max()))
    tol_z = rtol * max(1.0, float(Z.abs().max()))
    if err_x > tol_x:
        raise ContractViolation(f"{type(model).__name__} is not exactly invertible: "
                                f"max |inverse(forward(X)) − X| = {err_x:.3e} > {tol_x:.1e}")
    if err_z > tol_z:
        raise ContractViolation(f"{type(model).__name__}: max |forward(inverse(Z)) − Z| = "
                                f"{err_z:.3e} > {tol_z:.1e}")
    return {"input_error": err_x, "output_error": err_z}


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def gnrev_tiny_revmlp():
    """A float64 RevMLP 6 → 3 with two tanh blocks (M = 8), seeded."""
    import torch

    from gnrev_plugin.nn import RevMLP

    return RevMLP(6, 8, 2, 3, activation="tanh", linear_first_block=False, init_std=0.5,
                  seed=0, dtype=torch.float64)


@pytest.fixture
def gnrev_small_data():
    """``(X, y_mse, y_class)``: 5 float64 samples of width 6, targets (5, 3), labels in {0,1,2}."""
    import torch

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    return X, torch.randn(5, 3, generator=gen, dtype=torch.float64), \
        torch.randint(0, 3, (5,), generator=gen)


@pytest.fixture
def gnrev_dense_oracles() -> type[DenseOracles]:
    """:class:`DenseOracles` (dense ``torch.func`` Jacobian, GGN, Hessian, min-norm GN step)."""
    return DenseOracles


@pytest.fixture
def gnrev_contracts() -> types.SimpleNamespace:
    """The contract checks: ``check_exact_gn_update``, ``check_exactly_invertible``."""
    return types.SimpleNamespace(check_exact_gn_update=check_exact_gn_update,
                                 check_exactly_invertible=check_exactly_invertible,
                                 ContractViolation=ContractViolation)
