r"""Empirical neural tangent kernels and kernel similarities.

For outputs ``F(θ) ∈ R^{n×C}`` and the stacked Jacobian ``J = ∂ vec F / ∂θ ∈ R^{nC×P}`` (rows
sample-major: row ``i·C + c`` is ``∂F_{i,c}/∂θ``) the empirical NTK is ``Θ = J Jᵀ ∈ R^{nC×nC}``;
the trace-over-outputs variant is ``Θ^tr_{ii'} = Σ_c Θ_{(i,c),(i',c)}`` (``n × n``).

Three ways to build ``Θ``:

* ``"func"``: per-sample Jacobians with ``vmap(jacrev(·))`` (``torch.func``) and the contraction
  ``Θ = Σ_p J_p J_pᵀ`` — works for any module that runs on one sample;
* ``"curvlinops"``: the matrix-free operator ``J @ Jᵀ`` from curvlinops'
  ``JacobianLinearOperator``/``TransposedJacobianLinearOperator`` (:func:`ntk_operator`);
* ``"structured"`` (RevMLP only, :func:`revmlp_ntk`): every half-layer ``Z ↦ σ(Z C) Wᵀ + b`` is
  linear in its parameters ``[W, b]`` with design matrix ``A = [σ(h), 1] ∈ R^{n×(M+1)}``. If
  ``Γ_{(i,c),:} = ∂F_{i,c}/∂o_i ∈ R^{d/2}`` is the VJP of output coordinate ``c`` to the half-layer's
  output ``o_i``, then ``∂F_{i,c}/∂W_{jm} = Γ_{(i,c),j} A_{i,m}`` and

      Θ_l = (A Aᵀ ⊗ 1_{C×C}) ⊙ (Γ Γᵀ),       Θ = Σ_{half-layers l} Θ_l,

  which costs ``O(n² M + (nC)² d)`` per half-layer and never materialises ``J`` (``nC × P``). The
  ``C`` VJPs of all half-layers come from one batched reverse sweep through the blocks using the
  adjoint of ``CouplingFunction.jvp_input``: ``J_fᵀ u = ((u W) ⊙ σ'(h)) Cᵀ``.

Kernel comparisons: Frobenius alignment ``⟨K₁,K₂⟩_F / (‖K₁‖_F ‖K₂‖_F)`` (optionally after centring
``K ↦ HKH``, ``H = I − 11ᵀ/m``), the reference code's random-probe cosine, the NTK velocity of
Fort et al. (2020) between checkpoints, and kernel-target alignment (Cristianini et al. 2002).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ..nn.revmlp import RevMLP
from ..nn.validation import check_tensor
from ._params import param_names, select_params

__all__ = [
    "empirical_ntk", "revmlp_ntk", "ntk_operator", "kernel_alignment", "ntk_similarity",
    "random_probe_similarity", "ntk_velocity", "kernel_target_alignment", "center_kernel",
    "trace_over_outputs",
]


# ---------------------------------------------------------------------------------- builders
def trace_over_outputs(K: torch.Tensor, num_outputs: int) -> torch.Tensor:
    r"""The output-traced kernel :math:`\Theta^{\mathrm{tr}}` of a sample-major ``(nC, nC)`` kernel
    :math:`\Theta`.

    .. math::

        \Theta^{\mathrm{tr}}_{ii'} = \sum_c \Theta_{(i,c),(i',c)}.

    Args:
        K: Sample-major ``(nC, nC)`` kernel :math:`\Theta`.
        num_outputs: :math:`C`.

    Returns:
        The ``(n, n)`` kernel :math:`\Theta^{\mathrm{tr}}`.
    """
    n = K.shape[0] // num_outputs
    return K.view(n, num_outputs, n, num_outputs).diagonal(dim1=1, dim2=3).sum(-1)


def _ntk_func(model: nn.Module, X: torch.Tensor, params: list[torch.Tensor],
              trace_outputs: bool) -> torch.Tensor:
    names = param_names(model, params)
    ps = tuple(p.detach() for p in params)

    def f_single(ps, x):
        return functional_call(model, dict(zip(names, ps, strict=True)), (x.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f_single), in_dims=(None, 0))(ps, X)   # tuple of (n, C, *p.shape)
    n, C = jac[0].shape[:2]
    K = None
    for j in jac:
        j = j.reshape(n, C, -1)
        part = (torch.einsum("icp,jcp->ij", j, j) if trace_outputs
                else torch.einsum("iap,jbp->iajb", j, j).reshape(n * C, n * C))
        K = part if K is None else K + part
    return K


def ntk_operator(model: nn.Module, X: torch.Tensor,
                 params: Sequence[torch.Tensor] | None = None, batch_size: int | None = None):
    r"""The matrix-free empirical NTK :math:`\Theta = J J^\top` (curvlinops; ``(nC, nC)``, sample-major).

    Args:
        model: The network.
        X: Inputs (one batch).
        params: Parameters :math:`\theta` of :math:`J = \partial f / \partial \theta`; default all trainable.
        batch_size: Split ``X`` into batches of this size for the operator's data.

    Returns:
        The curvlinops operator :math:`\Theta = J J^\top`.
    """
    from curvlinops import JacobianLinearOperator, TransposedJacobianLinearOperator

    params = select_params(model, params)
    bs = batch_size or X.shape[0]
    dummy = torch.zeros(X.shape[0], device=X.device)          # curvlinops needs label tensors
    data = list(zip(X.split(bs), dummy.split(bs), strict=True))
    kw = dict(check_deterministic=False)
    return (JacobianLinearOperator(model, params, data, **kw)
            @ TransposedJacobianLinearOperator(model, params, data, **kw))


def _jvp_input_adjoint(fn, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``CouplingFunction.jvp_input``: ``J_f(Z)ᵀ u = ((u W) ⊙ σ'(h)) Cᵀ`` (batched u)."""
    return ((u @ fn.linear.weight) * fn.activation.derivative(h)) @ fn.projection.T


def _design_gram(fn, s: torch.Tensor) -> torch.Tensor | None:
    """``A Aᵀ`` for ``A = [σ(h), 1]`` restricted to the trainable parts (``None`` if frozen)."""
    w_on = fn.linear.weight.requires_grad
    b_on = fn.linear.bias is not None and fn.linear.bias.requires_grad
    if not (w_on or b_on):
        return None
    n = s.shape[0]
    AA = s @ s.T if w_on else torch.zeros(n, n, dtype=s.dtype, device=s.device)
    if b_on:
        AA += 1.0
    return AA


def _assemble(terms: list[tuple[torch.Tensor, torch.Tensor]], n: int, C: int,
              trace_outputs: bool, rows_per_chunk: int | None = None) -> torch.Tensor:
    """``Σ_l (AA_l ⊗ 1) ⊙ (Γ_l Γ_lᵀ)`` from ``terms = [(AA_l (n×n), Γ_l (C, n, d/2))]``.

    ``rows_per_chunk`` samples' rows are built at a time (default: all), which bounds the temporary
    ``Γ_l Γ_lᵀ`` buffer to ``rows_per_chunk·C × nC``. The work is memory-bound (``Γ_l`` has only
    ``d/2`` columns): per half-layer one thin GEMM and one fused multiply-add over the output.
    """
    dtype, device = terms[0][0].dtype, terms[0][0].device
    if trace_outputs:
        out = torch.zeros(n, n, dtype=dtype, device=device)
        for AA, gamma in terms:
            out.addcmul_(AA, torch.einsum("cij,ckj->ik", gamma, gamma))
        return out
    gs = [(AA, gamma.transpose(0, 1).reshape(n * C, -1)) for AA, gamma in terms]
    out = torch.empty(n * C, n * C, dtype=dtype, device=device)
    rows_per_chunk = n if rows_per_chunk is None else max(1, int(rows_per_chunk))
    # one reusable GEMM buffer: fresh (nC)² allocations cost page faults on every half-layer
    buf = torch.empty(min(n, rows_per_chunk) * C, n * C, dtype=dtype, device=device) \
        if len(gs) > 1 else None
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        rows = out[r0 * C:r1 * C]
        blk = rows.view(r1 - r0, C, n, C)
        for k, (AA, g) in enumerate(gs):
            w = AA[r0:r1, None, :, None]
            if k == 0:                                  # first term: GEMM straight into out
                torch.mm(g[r0 * C:r1 * C], g.T, out=rows)
                blk.mul_(w)
            else:
                tmp = buf[: (r1 - r0) * C]
                torch.mm(g[r0 * C:r1 * C], g.T, out=tmp)
                blk.addcmul_(tmp.view(r1 - r0, C, n, C), w)
    return out


@torch.no_grad()
def revmlp_ntk(model: RevMLP, X: torch.Tensor, trace_outputs: bool = False,
               per_layer: bool = False, rows_per_chunk: int | None = None
               ) -> torch.Tensor | dict[str, torch.Tensor]:
    r"""Structured empirical NTK of a :class:`~gnrev_plugin.nn.RevMLP` (no Jacobian materialised).

    ``Θ = Σ_l (A_l A_lᵀ ⊗ 1_{C×C}) ⊙ (Γ_l Γ_lᵀ)`` over half-layers ``l`` (see the module
    docstring). Outputs are the logits ``X^(L) U`` (or ``X^(L)`` without readout). Frozen weights
    or biases (``requires_grad=False``) are left out, as in the dense paths.

    Args:
        per_layer: return ``{"blocks.l.f": Θ_l, ...}`` instead of the sum.
        rows_per_chunk: build the output this many samples at a time (bounds temporary memory).
    """
    if not isinstance(model, RevMLP):
        raise TypeError(f"revmlp_ntk needs a RevMLP, got {type(model).__name__}")
    _, acts = model.features_with_activations(X)
    half = model.in_features // 2
    ref = acts[0].s_f
    if model.readout is None:
        U = torch.eye(model.in_features, dtype=ref.dtype, device=ref.device)
    else:
        U = model.readout.to(ref.dtype)
    n, C = ref.shape[0], U.shape[1]
    # cotangents of X^(L) = [Y1, Y2] for every output coordinate c: (C, n, d/2) each
    y1 = U[:half].T[:, None, :].expand(C, n, half).contiguous()
    y2 = U[half:].T[:, None, :].expand(C, n, half).contiguous()
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for l in range(model.num_blocks - 1, -1, -1):
        block, a = model.blocks[l], acts[l]
        # Y2 = X2 + g(Y1): g's output cotangent is ȳ2
        terms[f"blocks.{l}.g"] = (_design_gram(block.g, a.s_g), y2)
        y1 = y1 + _jvp_input_adjoint(block.g, a.h_g, y2)           # total cotangent of Y1
        # Y1 = X1 + f(X2): f's output cotangent is the total ȳ1
        terms[f"blocks.{l}.f"] = (_design_gram(block.f, a.s_f), y1)
        y2 = y2 + _jvp_input_adjoint(block.f, a.h_f, y1)           # cotangent of X2
    terms = {k: v for k, v in reversed(terms.items()) if v[0] is not None}
    if per_layer:
        return {k: _assemble([v], n, C, trace_outputs, rows_per_chunk)
                for k, v in terms.items()}
    if not terms:
        raise ValueError("the RevMLP has no trainable half-layer parameters")
    return _assemble(list(terms.values()), n, C, trace_outputs, rows_per_chunk)


def empirical_ntk(model: nn.Module, X: torch.Tensor, method: str = "auto",
                  trace_outputs: bool = False,
                  params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Empirical NTK ``Θ = J Jᵀ`` of ``model`` on ``X`` as a dense tensor.

    Args:
        method: ``"auto"`` (structured for a RevMLP with all parameters, else ``"func"``),
            ``"func"``, ``"curvlinops"`` or ``"structured"``.
        trace_outputs: return the ``n × n`` trace-over-outputs kernel instead of ``(nC, nC)``.
        params: parameter subset (``"func"``/``"curvlinops"`` only).

    Returns:
        ``(n·C, n·C)`` with rows ordered sample-major (row ``i·C + c``), or ``(n, n)``.
    """
    if method == "auto":
        method = "structured" if isinstance(model, RevMLP) and params is None else "func"
    if method == "structured":
        if params is not None:
            raise ValueError("the structured NTK uses all trainable RevMLP parameters; "
                             "freeze others with requires_grad=False instead of params=")
        return revmlp_ntk(model, X, trace_outputs=trace_outputs)
    params = select_params(model, params)
    if method == "func":
        return _ntk_func(model, X, params, trace_outputs)
    if method == "curvlinops":
        op = ntk_operator(model, X, params)
        K = op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)
        return trace_over_outputs(K, op.shape[0] // X.shape[0]) if trace_outputs else K
    raise ValueError(f"unknown NTK method {method!r}; use auto, func, curvlinops or structured")


# ---------------------------------------------------------------------------------- comparisons
def center_kernel(K: torch.Tensor) -> torch.Tensor:
    r"""The centred kernel :math:`H K H`, :math:`H = I - \mathbf{1}\mathbf{1}^\top / m`.

    Args:
        K: Square kernel.

    Returns:
        :math:`H K H`, :math:`H = I - \mathbf{1}\mathbf{1}^\top / m`.
    """
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def kernel_alignment(K1: torch.Tensor, K2: torch.Tensor, centered: bool = False) -> float:
    r"""The kernel alignment :math:`A(K_1, K_2)` (after :math:`K \mapsto HKH` when ``centered``).

    .. math::

        A(K_1, K_2) = \frac{\langle K_1, K_2 \rangle_F}{\lVert K_1 \rVert_F \lVert K_2 \rVert_F}.

    Args:
        K1: First kernel.
        K2: Second kernel (same shape).
        centered: Centre both kernels first.

    Returns:
        :math:`A(K_1, K_2)`.

    Raises:
        ValueError: For non-square or unequal shapes, or a zero kernel.
    """
    if K1.shape != K2.shape or K1.dim() != 2:
        raise ValueError(f"kernels must be square matrices of equal shape, got "
                         f"{tuple(K1.shape)} and {tuple(K2.shape)}")
    if centered:
        K1, K2 = center_kernel(K1), center_kernel(K2)
    den = K1.norm() * K2.norm()
    if den == 0:
        raise ValueError("kernel alignment is undefined for a zero kernel")
    return ((K1 * K2).sum() / den).item()


#: NTK similarity as used in the laziness plots: uncentred Frobenius alignment.
ntk_similarity = kernel_alignment


def ntk_velocity(K_prev: torch.Tensor, K_next: torch.Tensor, dt: float = 1.0,
                 distance: str = "cosine") -> float:
    r"""Rate of change of the NTK between checkpoints (Fort et al. 2020, "kernel velocity").

    ``distance="cosine"``: ``(1 − A(K_prev, K_next)) / dt`` with the uncentred alignment ``A``;
    ``distance="relative"``: ``‖K_next − K_prev‖_F / (‖K_prev‖_F dt)``.

    Args:
        K_prev: Kernel :math:`\Theta_t`.
        K_next: Kernel :math:`\Theta_{t + \Delta t}`.
        dt: Time between the checkpoints :math:`\Delta t > 0`.
        distance: ``"cosine"`` or ``"relative"``.

    Returns:
        The velocity.

    Raises:
        ValueError: For ``dt <= 0`` or an unknown ``distance``.
    """
    if dt <= 0:
        raise ValueError("dt must be positive")
    if distance == "cosine":
        return (1.0 - kernel_alignment(K_prev, K_next)) / dt
    if distance == "relative":
        return ((K_next - K_prev).norm() / (K_prev.norm() * dt)).item()
    raise ValueError("distance must be 'cosine' or 'relative'")


def kernel_target_alignment(K: torch.Tensor, Y: torch.Tensor, num_classes: int | None = None,
                            centered: bool = True) -> float:
    """Kernel-target alignment ``A(K, T)`` (Cristianini et al. 2002; centred: Cortes et al. 2012).

    ``Y`` is ``(n, C)`` targets or ``(n,)`` class indices (one-hot encoded). For an ``n × n``
    kernel ``T = Y Yᵀ``; for a sample-major ``(nC, nC)`` kernel ``T = vec(Y) vec(Y)ᵀ``.

    Args:
        K: ``(n, n)`` or sample-major ``(nC, nC)`` kernel.
        Y: Targets ``(n, C)`` or class indices ``(n,)``.
        num_classes: :math:`C` for class indices (default: ``max(Y) + 1``).
        centered: Use the centred alignment.

    Returns:
        :math:`A(K, T)`.

    Raises:
        ValueError: If the kernel size matches neither :math:`n` nor :math:`nC`.
    """
    if Y.dim() == 1:
        C = num_classes or int(Y.max()) + 1
        Y = torch.nn.functional.one_hot(Y.long(), C)
    Y = Y.to(K.dtype)
    if K.shape[0] == Y.shape[0]:
        T = Y @ Y.T
    elif K.shape[0] == Y.numel():
        y = Y.reshape(-1, 1)
        T = y @ y.T
    else:
        raise ValueError(f"kernel of size {K.shape[0]} matches neither n={Y.shape[0]} "
                         f"nor n·C={Y.numel()}")
    return kernel_alignment(K, T, centered=centered)


class _OutputWrapper(nn.Module):
    def __init__(self, model: nn.Module, output_fn: Callable) -> None:
        super().__init__()
        self.model, self.output_fn = model, output_fn

    def forward(self, x):
        return self.output_fn(self.model, x)


def _kernel_probe(model: nn.Module, X: torch.Tensor, v: torch.Tensor, output_fn, mode: str):
    wrap = _OutputWrapper(model, output_fn)
    names = [n for n, p in wrap.named_parameters() if p.requires_grad]
    ps = {n: p.detach() for n, p in wrap.named_parameters() if p.requires_grad}

    def f(ps_):
        return functional_call(wrap, ps_, (X,))

    out, vjp_fn = vjp(f, ps)
    (jtv,) = vjp_fn(v.reshape(out.shape).to(out.dtype))
    if mode == "jacobian":
        return torch.cat([jtv[n].reshape(-1) for n in names])
    _, kv = jvp(f, (ps,), (jtv,))
    return kv.reshape(-1)


def random_probe_similarity(model_a: nn.Module, model_b: nn.Module, X: torch.Tensor,
                            num_probes: int = 100, mode: str = "kernel",
                            output_fn: Callable | None = None, seed: int = 0) -> float:
    r"""The reference code's NTK similarity :math:`\cos(K_a \bar v, K_b \bar v)`,
    :math:`\bar v = \frac{1}{S} \sum_s v_s`.

    ``v_s ~ N(0, I)`` in output space (the same draws for both models, ``S = num_probes``);
    ``K v = J (Jᵀ v)`` is one VJP followed by one JVP. Since ``K`` is linear,
    ``(1/S) Σ_s K v_s = K v̄`` and one product per model suffices. ``mode="jacobian"`` compares
    ``J_aᵀ v̄`` and ``J_bᵀ v̄`` (parameter space; the models must have equal parameter shapes).
    ``output_fn(model, X)`` selects the output (default ``model(X)``; the reference code uses
    the RevMLP features ``X^(L)``: ``lambda m, x: m.features(x)``).

    Args:
        model_a: First model.
        model_b: Second model.
        X: Inputs.
        num_probes: :math:`S`.
        mode: ``"kernel"`` or ``"jacobian"``.
        output_fn: ``output_fn(model, X)`` selecting the output.
        seed: Seed of the probes.

    Returns:
        :math:`\cos(K_a \bar v, K_b \bar v)` (or of :math:`J_a^\top \bar v`, :math:`J_b^\top \bar v`).

    Raises:
        ValueError: For an unknown ``mode`` or vectors of different shapes.
    """
    if mode not in ("kernel", "jacobian"):
        raise ValueError("mode must be 'kernel' or 'jacobian'")
    check_tensor("random_probe_similarity", "X", X)   # an empty batch is no similarity of 0
    output_fn = output_fn or (lambda m, x: m(x))
    with torch.no_grad():
        shape = output_fn(model_a, X).shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(num_probes, *shape, generator=gen, dtype=torch.float64,
                    device="cpu").mean(0).to(X.device)
    a = _kernel_probe(model_a, X, v, output_fn, mode)
    b = _kernel_probe(model_b, X, v, output_fn, mode)
    if a.shape != b.shape:
        raise ValueError("the two models give vectors of different shapes")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()
