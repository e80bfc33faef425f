r"""The curvature operators of the decomposition: the NME as the Hessian of a surrogate.

For an empirical risk ``L(θ) = c Σ_n ℓ(z_n(θ), y_n)`` with logits ``z_n = f(θ, x_n)`` the
nonlinear modelling error is the Hessian of the stop-gradient surrogate

.. math::

    s(θ) = c \sum_n \langle \operatorname{stopgrad}(∇_z ℓ_n), z_n(θ) \rangle,
    \qquad \mathrm{NME} = ∇²_θ s = c \sum_n \sum_k [∇_z ℓ_n]_k ∇²_θ z_{n,k},

one double-backward per product (:class:`SurrogateNMELinearOperator`), densely
:func:`nme_surrogate_dense`. ``H`` and ``G`` themselves are curvlinops' operators.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from ...compat.curvlinops import CurvatureLinearOperator, PyTorchLinearOperator
from ...compat.torch_nn import installed_hooks
from .._params import as_batches, param_names, select_params

__all__ = ["SurrogateNMELinearOperator", "nme_surrogate_dense", "dense_matrix",
           "assert_not_backpack_extended"]


def assert_not_backpack_extended(*modules: nn.Module) -> None:
    """Raise if a module carries ``backpack.extend``'s hooks (they break ``torch.func`` transforms).

    Detection looks at the installed hooks, not BackPACK's ``_backpack_extend`` flag (which
    modules may also set to opt out of extension).

    Args:
        modules: the modules to check (with all their submodules); non-modules are ignored.

    Raises:
        ValueError: a module (or a submodule) has a hook installed by BackPACK.
    """
    def hooked(m: nn.Module) -> bool:
        hooks = installed_hooks(m)
        return any(getattr(h, "__module__", "").startswith("backpack") for h in hooks)

    for mod in modules:
        if isinstance(mod, nn.Module) and any(hooked(m) for m in mod.modules()):
            raise ValueError(
                f"{type(mod).__name__} was extended by BackPACK; its hooks break curvlinops' "
                "torch.func transforms. Pass a non-extended copy (new module + load_state_dict).")


def _reduction_factor(loss_fn: nn.Module) -> str:
    red = getattr(loss_fn, "reduction", None)
    if red not in ("mean", "sum"):
        raise ValueError("loss_fn must be an nn.Module loss with reduction 'mean' or 'sum' "
                         f"(curvlinops renormalises batches by it); got reduction={red!r}")
    return red


class SurrogateNMELinearOperator(CurvatureLinearOperator):
    r"""The NME as the Hessian of ``s(θ) = c Σ_n ⟨stopgrad(∇_z ℓ_n), z_n(θ)⟩``.

    Each product is one forward-over-reverse pass (``jvp`` of ``grad s``) per batch; batches are
    weighted like curvlinops' own operators (``N_B/N`` for mean reduction), so it equals
    ``HessianLinearOperator − GGNLinearOperator`` for the same arguments.

    Args:
        model_func: The network.
        loss_func: Loss module with reduction ``"mean"`` or ``"sum"``.
        params: Parameters :math:`\theta`.
        data: Iterable of ``(X, y)`` batches.
        **kwargs: curvlinops' ``CurvatureLinearOperator`` options.
    """

    SELF_ADJOINT: bool = True

    @cached_property
    def _mp(self):
        model, loss_fn, params = self._model_func, self._loss_func, tuple(self._params)
        names = param_names(model, params)

        def f(ps, X):
            return functional_call(model, dict(zip(names, ps, strict=True)), (X,))

        @torch.no_grad()
        def nme_vp(X, y, *v):
            z0 = f(params, X)
            g = grad(lambda z: loss_fn(z, y))(z0)            # ∇_z ℓ with the loss's own scaling

            def s(*ps):
                return (g * f(ps, X)).sum()

            _, out = jvp(jacrev(s, argnums=tuple(range(len(params)))), params, tuple(v))
            return out

        dims = tuple(p.ndim for p in params)
        return vmap(nme_vp, in_dims=(None, None, *dims), out_dims=dims, randomness="same")

    def _matmat_batch(self, X, y, M):
        return list(self._mp(X, y, *M))


def nme_surrogate_dense(model: nn.Module, loss_fn: nn.Module, data,
                        params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    r"""Dense NME ``(P, P)`` as ``torch.func.hessian`` of the stop-gradient surrogate ``s(θ)``.

    .. math::

        \mathrm{NME} = \sum_B w_B \, ∇²_θ \sum_{n \in B}
        \langle \operatorname{stopgrad}(∇_z ℓ_n), z_n(θ) \rangle,
        \qquad w_B = N_B / N \text{ (mean reduction) or } 1 \text{ (sum)},

    batches weighted as in curvlinops (``∇_z ℓ_n`` carries the loss's own scaling per batch).

    Args:
        model: any ``nn.Module``.
        loss_fn: an ``nn.Module`` loss with ``reduction`` ``'mean'`` or ``'sum'``.
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches.
        params: subset of parameters (default: all trainable ones), in operator order.

    Returns:
        The dense ``(P, P)`` NME matrix in the parameters' dtype.
    """
    params = select_params(model, params)
    names = param_names(model, params)
    batches = as_batches(data)
    red = _reduction_factor(loss_fn)
    n_total = sum(X.shape[0] for X, _ in batches)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(v):
        return {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}

    out = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    for X, y in batches:
        z0 = model(X).detach().requires_grad_(True)
        g = torch.autograd.grad(loss_fn(z0, y), z0)[0].detach()
        w = X.shape[0] / n_total if red == "mean" else 1.0

        def s(v, X=X, g=g):
            return (g * functional_call(model, unflatten(v), (X,))).sum()

        out += w * hessian(s)(flat)
    return out


def dense_matrix(op: PyTorchLinearOperator) -> torch.Tensor:
    r"""The dense matrix of a curvlinops operator, ``P`` matrix-vector products.

    .. math::

        A = A \, I_P.

    Args:
        op: a curvlinops ``PyTorchLinearOperator`` of shape ``(P, Q)``.

    Returns:
        The ``(P, Q)`` matrix in the operator's dtype and device.
    """
    return op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)
