"""curvlinops adapter: the NME, the NTK and the exact GN step as ``PyTorchLinearOperator`` s.

All three subclass curvlinops' ``PyTorchLinearOperator`` (:mod:`gnrev_plugin.compat.curvlinops`), so they
compose with curvlinops' arithmetic (``A + B``, ``c * A``, ``A @ B``), its estimators
(``hutchinson_trace``, ``hutchinson_diag``, ``xtrace``, ``lanczos_approximate_spectrum``, ...),
inverses (``CGInverseLinearOperator``) and SciPy (``op.to_scipy()`` + ``scipy.sparse.linalg.eigsh``).
Notation: a model ``F(θ) ∈ R^{N×C}`` on the data, the empirical risk
``L(θ) = c Σ_n ℓ(F_n(θ), y_n)`` (``c = 1/N`` for ``reduction="mean"``, ``1`` for ``"sum"``), the
Jacobian ``J = ∂F/∂θ`` (``N·C × P``, rows sample-major).

* :class:`NMELinearOperator` — the *non-linear modelling error*
  ``NME = H − G = c Σ_{n,k} (∂ℓ/∂F_{nk}) ∇²_θ F_{nk}``, applied matrix-free as the Hessian of the
  stop-gradient surrogate ``s(θ) = c Σ_n ⟨sg(∇_F ℓ(F_n, y_n)), F_n(θ)⟩`` (one forward-over-reverse
  product per column, never forming ``H`` or ``G``).
* :class:`NTKLinearOperator` — the empirical NTK ``Θ = J Jᵀ`` (``N·C × N·C``), as
  curvlinops' ``JacobianLinearOperator`` after its ``TransposedJacobianLinearOperator``.
* :class:`GaussNewtonStepOperator` — for a :class:`~gnrev_plugin.nn.RevMLP` on a batch ``X``, the
  per-block right inverse ``R`` (``P × N·C``) of Buffelli et al. (eqs. 16-17) that
  :func:`gnrev_plugin.optim.exact_gn.exact_gn_direction` applies: ``J R T = T`` for every
  output-space ``T``, so ``J @ GN`` is the identity on output space. The exact GN step of
  :class:`~gnrev_plugin.optim.ExactGN` with step size ``α`` is ``GN @ (−α ε)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from curvlinops import JacobianLinearOperator, TransposedJacobianLinearOperator
from torch import Tensor, nn

from ..compat.curvlinops import PyTorchLinearOperator
from ..metrics.hessian import SurrogateNMELinearOperator, dense_matrix

__all__ = ["NMELinearOperator", "NTKLinearOperator", "GaussNewtonStepOperator", "to_dense"]


#: ``op @ I``, the dense matrix of a (small) operator: :func:`gnrev_plugin.metrics.dense_matrix`
#: under the name curvlinops users know.
to_dense = dense_matrix


class NMELinearOperator(SurrogateNMELinearOperator):
    r"""The non-linear modelling error ``NME = H − G`` of an empirical risk.

    ``NME = c Σ_n Σ_k (∂ℓ(F_n, y_n)/∂F_{nk}) ∇²_θ F_{nk}(θ)``, the part of the Hessian that the
    Gauss-Newton matrix ``G = Jᵀ (∇²_F L) J`` drops. It is the Hessian of the surrogate
    ``s(θ) = c Σ_n ⟨sg(∇_F ℓ(F_n, y_n)), F_n(θ)⟩`` whose loss-gradient factor is held fixed
    (``sg`` = stop-gradient), so each product is one ``jvp(jacrev(s))``, vmapped over columns
    (the implementation is :class:`gnrev_plugin.metrics.SurrogateNMELinearOperator`; this is its
    host-facing name).

    Same constructor as :class:`curvlinops.HessianLinearOperator` (without ``block_sizes``):
    ``(model_func, loss_func, params, data, progressbar=False, check_deterministic=True,
    num_data=None, batch_size_fn=None)``. Mean-reduced losses are renormalised over batches
    exactly like curvlinops' own operators, so ``NME == Hessian − GGN`` over multi-batch data.

    .. math::

        \mathrm{NME} = H - G = c \sum_n \sum_k \frac{\partial \ell(F_n, y_n)}{\partial F_{nk}}
        \nabla^2_\theta F_{nk}(\theta), \qquad G = J^\top (\nabla^2_F L) J.

    Args:
        model_func: The network.
        loss_func: Loss module with reduction ``"mean"`` or ``"sum"``.
        params: Parameters :math:`\theta`.
        data: Iterable of ``(X, y)`` batches.
        progressbar: Show a progress bar.
        check_deterministic: Check that the data and model are deterministic.
        num_data: Number of samples (counted if ``None``).
        batch_size_fn: Batch size of a data item.
    """

    def _adjoint(self) -> NMELinearOperator:
        return self


def _as_data(data: Any) -> list[tuple[Tensor, Tensor]] | Iterable:
    """Accept a plain input tensor ``X`` as one batch with dummy labels (curvlinops needs some)."""
    if isinstance(data, Tensor):
        return [(data, torch.zeros(data.shape[0], device=data.device))]
    return data


class NTKLinearOperator(PyTorchLinearOperator):
    r"""The empirical neural tangent kernel ``Θ = J Jᵀ`` on the data (``N·C × N·C``).

    ``Θ[(n,k), (m,l)] = ⟨∂F_{nk}/∂θ, ∂F_{ml}/∂θ⟩``, rows and columns ordered sample-major (the
    layout of ``model(X).flatten()``), so ``op @ v`` takes ``v`` shaped ``(N·C,)`` or, in list
    format, ``[(N, C)]``. Products are ``J (Jᵀ v)`` with curvlinops'
    :class:`~curvlinops.JacobianLinearOperator` and
    :class:`~curvlinops.TransposedJacobianLinearOperator`; ``Θ`` is never formed.

    Args:
        model_func: the network.
        params: the parameters ``θ`` the kernel is taken over (a subset gives that subset's NTK).
        data: an input tensor ``X`` or curvlinops-style batches ``[(X, y), ...]`` (labels unused).
        progressbar, check_deterministic, num_data, batch_size_fn: as in curvlinops.
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        model_func: nn.Module,
        params: list[nn.Parameter],
        data: Tensor | Iterable,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable | None = None,
    ) -> None:
        kw = dict(progressbar=progressbar, check_deterministic=check_deterministic,
                  num_data=num_data, batch_size_fn=batch_size_fn)
        data = _as_data(data)
        self._J = JacobianLinearOperator(model_func, params, data, **kw)
        self._JT = TransposedJacobianLinearOperator(model_func, params, data, **kw)
        super().__init__(self._J._out_shape, self._J._out_shape)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        return self._J._matmat(self._JT._matmat(M))

    def _adjoint(self) -> NTKLinearOperator:
        return self

    @property
    def device(self) -> torch.device:
        """The operator's device.

        Returns:
            The device of :math:`J`.
        """
        return self._J.device

    @property
    def dtype(self) -> torch.dtype:
        """The operator's dtype.

        Returns:
            The dtype of :math:`J`.
        """
        return self._J.dtype


class _DenseOperator(PyTorchLinearOperator):
    """A lazily built dense matrix as an operator (the adjoint of the GN step operator)."""

    def __init__(self, build: Callable[[], Tensor], out_shape, in_shape, device, dtype) -> None:
        self._build, self._device, self._dtype = build, device, dtype
        super().__init__(in_shape, out_shape)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        A = self._build()
        K = M[0].shape[-1]
        flat = torch.cat([m.reshape(-1, K) for m in M])
        out = (A @ flat).split(self._out_shape_flat)
        return [o.reshape(*s, K) for o, s in zip(out, self._out_shape, strict=True)]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype


class GaussNewtonStepOperator(PyTorchLinearOperator):
    r"""The RevMLP's per-block right inverse ``R`` of ``J`` on a batch, as an operator.

    ``R T = exact_gn_direction(model, X, T)`` for an output-space ``T`` (shape ``model(X).shape``),
    i.e. (Buffelli et al., eqs. 16-17) the readout pre-image ``E = T (UᵀU)⁻¹Uᵀ``, the inverse-JVP
    pull-back ``E^(ℓ)`` to every block and the per-half-layer minimum-norm solves
    ``Δ_f = A_f⁺(w E1^(ℓ))``, ``Δ_g = A_g⁺(w E2^(ℓ) − J_g[A_f Δ_f])``. ``R`` is linear in ``T``
    and ``J R = I`` on output space whenever one block's systems have full row rank (the
    exactness contract of :class:`~gnrev_plugin.optim.ExactGN`; ``rank_policy`` decides what a
    rank-deficient batch does). Shape ``(P, N·C)``; output in ``model.parameters()`` order.

    ``J @ GN`` (with curvlinops' ``JacobianLinearOperator`` on the same batch) is therefore the
    identity, which curvlinops' estimators and SciPy can check.

    Args:
        model: a :class:`~gnrev_plugin.nn.RevMLP`.
        X: the batch the Jacobian is taken on.
        solver, rank_policy, solver_options: passed to ``exact_gn_direction``.
    """

    def __init__(self, model: nn.Module, X: Tensor, *, solver: str = "cholesky",
                 rank_policy: str = "raise", **solver_options: Any) -> None:
        from ..nn import RevMLP
        from ..optim.exact_gn import exact_gn_direction

        if not isinstance(model, RevMLP):
            raise TypeError("GaussNewtonStepOperator needs a gnrev_plugin.nn.RevMLP (the per-block "
                            f"right inverse is specific to it), got {type(model).__name__}; use "
                            "gnrev_plugin.optim.DenseGN for other models")
        self._model, self._X = model, X
        self._direction = exact_gn_direction
        self._kw = dict(solver=solver, rank_policy=rank_policy, **solver_options)
        with torch.no_grad():
            out_shape = tuple(model(X).shape)
        p = next(model.parameters())
        self._device, self._dtype = p.device, p.dtype
        self._dense: Tensor | None = None
        super().__init__([out_shape], [tuple(q.shape) for q in model.parameters()])

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        (T,) = M  # (N, C, K)
        cols = [self._direction(self._model, self._X, T[..., k], **self._kw)
                for k in range(T.shape[-1])]
        return [torch.stack([col[i] for col in cols], dim=-1) for i in range(len(self._out_shape))]

    def dense(self) -> Tensor:
        """``R`` as a dense ``(P, N·C)`` matrix (``N·C`` products, cached).

        Returns:
            :math:`R`, ``(P, NC)``.
        """
        if self._dense is None:
            self._dense = to_dense(self)
        return self._dense

    def _adjoint(self) -> PyTorchLinearOperator:
        """``Rᵀ`` (``N·C × P``). ``R`` is a composition of solves with no cheap transpose, so
        the adjoint materialises ``R`` once (``N·C`` products; ``N·C`` is a batch's output
        size) and multiplies with its transpose."""
        return _DenseOperator(lambda: self.dense().T, self._in_shape, self._out_shape,
                              self._device, self._dtype)

    @property
    def device(self) -> torch.device:
        """The operator's device.

        Returns:
            The device of the model's parameters.
        """
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The operator's dtype.

        Returns:
            The dtype of the model's parameters.
        """
        return self._dtype
