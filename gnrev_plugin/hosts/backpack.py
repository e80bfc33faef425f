"""BackPACK adapter: the additive coupling block and the RevMLP as BackPACK leaf modules.

Usage (copy-paste)::

    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, DiagGGNExact, KFAC
    from gnrev_plugin.hosts.backpack import register

    model, lossf = extend(copy.deepcopy(revmlp)), extend(nn.CrossEntropyLoss())
    with backpack(*register(BatchGrad(), DiagGGNExact(), KFAC())):
        lossf(model(X), y).backward()
    model.blocks[0].f.linear.weight.grad_batch       # (N, d/2, M)
    model.blocks[0].f.linear.weight.diag_ggn_exact   # (d/2, M)
    model.blocks[0].f.linear.weight.kfac             # [G, A]

Why a leaf. BackPACK's second-order extensions backpropagate a quantity through *every* module
of the graph; a coupling block's forward is slicing, fixed projections, activations, additions
and ``torch.cat``, which are not modules. So the block (and the whole :class:`RevMLP`, whose
readout ``F = X^(L) U`` is a plain matmul) is one leaf: its parts carry ``_backpack_extend =
True`` and are not hooked by ``backpack.extend``, and :func:`register` gives each extension a
module extension for :class:`AdditiveCoupling` and :class:`RevMLP`.

What the leaf extension computes. For a block ``Y1 = X1 + u_f``, ``u_f = σ(X2 C_f) W_fᵀ + b_f``,
``Y2 = X2 + u_g``, ``u_g = σ(Y1 C_g) W_gᵀ + b_g``, the quantity ``V`` that BackPACK hands to the
block's output (the output gradient for first-order extensions, ``[K, N, d]`` square-root factors
``S`` of the GGN / MC-Fisher / KFAC, the signed factor lists of ``DiagHessian``) is pulled back
by the block's exact transposed Jacobians, computed with ``torch.func.vjp`` on the block's own
functional forward: ``V ↦ (V_{u_f}, V_{u_g}, V_X) = (J_{u_f}ᵀV, J_{u_g}ᵀV, J_Xᵀ V)``, and
``V_{u_f} = V1 + J_g(Y1)ᵀ V2``, ``V_{u_g} = V2``. Each inner ``nn.Linear`` ``u = s Wᵀ + b`` then gets
its quantity from **BackPACK's own nn.Linear rule** of the same extension, evaluated with input
``s = σ(Z C)`` and output quantity ``V_u`` (e.g. ``DiagGGNExact``:
``diag_W = Σ_{k,n} (V_u[k,n] ⊗ s[n])²``; ``KFAC``: ``[Σ_{k,n} V_u V_uᵀ, sᵀs/N]``), so conventions
(scaling, savefields, subsampling) are BackPACK's. ``V_X`` is stored for the block input, so
blocks compose with any BackPACK-supported module before them.

``DiagHessian``/``BatchDiagHessian`` need the block's second derivatives in its inputs and in
each single parameter to vanish, which holds for ``σ'' = 0`` (ReLU, identity): then
``∂²Y/∂X² = 0`` and ``∂²Y/∂θ_i² = 0`` (Y is linear in each of ``W_f``, ``b_f``, ``W_g``, ``b_g`` alone,
up to ReLU kinks), and the diagonal Hessian is the backpropagated factor lists' diagonal. Other
activations raise ``NotImplementedError`` naming the extension; so does ``KFRA`` (its
batch-averaged backpropagation has no transposed-Jacobian form here), and :func:`register`
refuses extensions that have no ``nn.Linear`` rule (e.g. the ``curvmatprod`` ones).

Never hand an ``extend``-ed module or loss to curvlinops (functorch cannot trace BackPACK's
backward hooks): extend a ``copy.deepcopy`` of the model.
"""

from __future__ import annotations

import torch
from backpack.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.functional import linear

from ..compat.backpack import module_extensions
from ..nn import AdditiveCoupling, RevMLP

__all__ = ["register", "all_extensions", "SUPPORTED_EXTENSIONS", "CouplingLeafExtension",
           "UNSUPPORTED_MESSAGE"]

#: Extensions :func:`register` accepts (all of BackPACK's with an ``nn.Linear`` rule and a
#: transposed-Jacobian backpropagation).
SUPPORTED_EXTENSIONS: tuple[type[BackpropExtension], ...] = (
    BatchGrad, BatchL2Grad, SumGradSquared, Variance,
    DiagGGNExact, DiagGGNMC, BatchDiagGGNExact, BatchDiagGGNMC, SqrtGGNExact, SqrtGGNMC,
    KFAC, KFLR, DiagHessian, BatchDiagHessian,
)
_NEEDS_ZERO_CURVATURE = (DiagHessian, BatchDiagHessian)
_ZERO_CURVATURE_ACTIVATIONS = ("relu", "identity")
UNSUPPORTED_MESSAGE = ("{ext} is not supported on gnrev's AdditiveCoupling/RevMLP leaf modules; "
                       "supported: {supported}")


def _supported_names() -> str:
    return ", ".join(e.__name__ for e in SUPPORTED_EXTENSIONS)


def _linear_rule(ext: BackpropExtension) -> ModuleExtension:
    """BackPACK's own module extension for ``nn.Linear`` inside ``ext``."""
    table = module_extensions(ext)
    rule = table.get(nn.Linear)
    if rule is None or isinstance(rule, CouplingLeafExtension):
        raise NotImplementedError(UNSUPPORTED_MESSAGE.format(ext=type(ext).__name__,
                                                             supported=_supported_names()))
    return rule


# ------------------------------------------------------------------------------ functional blocks
def _block_forward(block: AdditiveCoupling, x: Tensor, du_f, du_g):
    """The block's forward as a function of its input and of (zero) offsets on the inner outputs
    ``u_f``, ``u_g``, so that one VJP gives the transposed Jacobians to all three. Returns the
    output and, as auxiliary data, ``(s_f, u_f, s_g, u_g)``. Module ``__call__`` s are avoided
    (no hooks fire inside BackPACK's backward pass)."""
    x1, x2 = block.split(x)
    f, g = block.f, block.g
    s_f = f.features(x2)[1]
    u_f = linear(s_f, f.linear.weight.detach(), f.linear.bias.detach())
    y1 = x1 + u_f + du_f
    s_g = g.features(y1)[1]
    u_g = linear(s_g, g.linear.weight.detach(), g.linear.bias.detach())
    return torch.cat([y1, x2 + u_g + du_g], dim=-1), (s_f, u_f, s_g, u_g)


def _inner_io(block: AdditiveCoupling, x: Tensor) -> tuple[Tensor, list[tuple[nn.Linear, Tensor,
                                                                               Tensor]]]:
    """Block output and ``(linear, input s, output u)`` of both inner layers (detached)."""
    with torch.no_grad():
        y, (s_f, u_f, s_g, u_g) = _block_forward(block, x, 0.0, 0.0)
    return y, [(block.f.linear, s_f, u_f), (block.g.linear, s_g, u_g)]


class _Pullback:
    """``V ↦ (V_{u_f}, V_{u_g}, V_X)`` at a block input ``x``, for tensors ``[*lead, n, d]``."""

    def __init__(self, block: AdditiveCoupling, x: Tensor) -> None:
        zero = x.new_zeros(*x.shape[:-1], block.half)
        _, self._vjp, _ = vjp(lambda xx, a, b: _block_forward(block, xx, a, b), x, zero,
                              zero.clone(), has_aux=True)

    def __call__(self, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fn = self._vjp
        for _ in range(V.dim() - 2):  # leading dims (K columns of a square-root factor, ...)
            fn = vmap(fn)
        dx, du_f, du_g = fn(V)
        return du_f, du_g, dx


def _map(q, fn):
    """Apply ``fn`` to a backpropagated quantity: a tensor or DiagHessian's signed lists."""
    if isinstance(q, dict):
        return {"matrices": [fn(m) for m in q["matrices"]], "signs": list(q["signs"])}
    return fn(q)


# ------------------------------------------------------------------------------ module extension
class CouplingLeafExtension(ModuleExtension):
    """One BackPACK module extension for :class:`AdditiveCoupling` and :class:`RevMLP` leaves.

    It replaces :meth:`ModuleExtension.__call__`: fetch the quantity BackPACK stored for the
    leaf's output, pull it back block by block (the readout ``U`` first, for a RevMLP),
    evaluate the extension's own ``nn.Linear`` rule on every inner layer and store the result on
    its parameters, then store the quantity for the leaf's input.
    """

    def __init__(self) -> None:
        super().__init__(params=None)

    # -- structure
    @staticmethod
    def _blocks_and_input(module: nn.Module) -> tuple[list[AdditiveCoupling], Tensor]:
        x = module.input0.detach()
        if isinstance(module, RevMLP):
            return list(module.blocks), x.reshape(x.shape[0], -1)
        return [module], x

    @staticmethod
    def _check(ext: BackpropExtension, blocks: list[AdditiveCoupling], x: Tensor) -> None:
        name = type(ext).__name__
        if x.dim() != 2:
            raise NotImplementedError(f"{name} on AdditiveCoupling supports inputs (N, d) only, "
                                      f"got shape {tuple(x.shape)}")
        if isinstance(ext, KFRA):
            raise NotImplementedError(UNSUPPORTED_MESSAGE.format(ext=name,
                                                                 supported=_supported_names()))
        if isinstance(ext, _NEEDS_ZERO_CURVATURE):
            for b in blocks:
                for h in (b.f, b.g):
                    if h.activation.name not in _ZERO_CURVATURE_ACTIVATIONS:
                        raise NotImplementedError(
                            f"{name} on AdditiveCoupling needs σ'' = 0 (activations "
                            f"{', '.join(_ZERO_CURVATURE_ACTIVATIONS)}); this block uses "
                            f"{h.activation.name!r}, whose second-derivative terms it would "
                            "drop. Use curvlinops' HessianLinearOperator instead.")

    def __call__(self, ext: BackpropExtension, module: nn.Module, g_inp, g_out) -> None:
        blocks, x = self._blocks_and_input(module)
        self._check(ext, blocks, x)
        rule = _linear_rule(ext)
        second_order = ext.expects_backpropagation_quantities()
        sub = ext.get_subsampling()

        grad_out = g_out[0].detach()
        bp = None
        if second_order:
            out = module.output
            keep = out.grad_fn is None or getattr(out, "retains_grad", False)
            bp = ext.saved_quantities.retrieve_quantity(out.data_ptr(), not keep)
            if bp is None:
                raise AssertionError(
                    f"BackPACK extension {type(ext).__name__} expects a backpropagation quantity "
                    f"for the output of {type(module).__name__}, but none was stored: is the "
                    "loss extend()-ed and everything between them a supported module?")

        readout = getattr(module, "readout", None) if isinstance(module, RevMLP) else None
        if readout is not None:  # F = Z U  ⇒  V_Z = V Uᵀ
            grad_out = grad_out @ readout.T
            bp = None if bp is None else _map(bp, lambda v: v @ readout.T)

        # inputs of every block (full batch) and their subsampled versions for the pull-backs
        inputs = [x]
        ios = []
        for b in blocks:
            y, io = _inner_io(b, inputs[-1])
            ios.append(io)
            inputs.append(y)
        for idx in reversed(range(len(blocks))):
            b, xin = blocks[idx], inputs[idx]
            g_f, g_g, grad_out = _Pullback(b, xin)(grad_out)
            bp_f = bp_g = None
            if bp is not None:
                pull = _Pullback(b, xin if sub is None else xin[sub])
                if isinstance(bp, dict):  # DiagHessian: signed lists of square-root factors
                    trips, signs = [pull(m) for m in bp["matrices"]], bp["signs"]
                    bp_f, bp_g, bp = ({"matrices": [t[i] for t in trips], "signs": list(signs)}
                                      for i in range(3))
                else:
                    bp_f, bp_g, bp = pull(bp)
            for (lin, s, u), gu, bu in zip(ios[idx], (g_f, g_g), (bp_f, bp_g), strict=True):
                self._apply_linear_rule(rule, ext, lin, s, u, gu, bu)

        if second_order and module.input0.requires_grad:
            shape = module.input0.shape
            bp = _map(bp, lambda v: v.reshape(*v.shape[:-2], *shape) if sub is None
                      else v.reshape(*v.shape[:-2], len(sub), *shape[1:]))
            ext.saved_quantities.save_quantity(module.input0.data_ptr(), bp,
                                               ext.accumulate_backpropagated_quantities)

    @staticmethod
    def _apply_linear_rule(rule: ModuleExtension, ext: BackpropExtension, lin: nn.Linear,
                           s: Tensor, u: Tensor, grad_u: Tensor, bp_u) -> None:
        """Evaluate BackPACK's ``nn.Linear`` rule of ``ext`` on one inner layer and save it."""
        lin.input0, lin.output = s, u
        try:
            for name in ("weight", "bias"):
                p = getattr(lin, name)
                if p is not None and p.requires_grad:
                    value = getattr(rule, name)(ext, lin, (None,), (grad_u,), bp_u)
                    setattr(p, ext.savefield, value)
        finally:
            del lin.input0, lin.output


# ------------------------------------------------------------------------------ public helpers
def register(*extensions: BackpropExtension) -> tuple[BackpropExtension, ...]:
    """Give each BackPACK extension instance the module extension for gnrev's leaf modules.

    ``register(*exts)`` sets (``set_module_extension(..., overwrite=True)``) a
    :class:`CouplingLeafExtension` for :class:`~gnrev_plugin.nn.AdditiveCoupling` and
    :class:`~gnrev_plugin.nn.RevMLP` on every extension and returns the same instances, for
    ``with backpack(*register(DiagGGNExact(), BatchGrad())):``.

    Raises:
        NotImplementedError: for an extension outside :data:`SUPPORTED_EXTENSIONS` (the
            message names it and lists the supported ones).
        ValueError: for something that is not a BackPACK extension instance.
    """
    leaf = CouplingLeafExtension()
    for ext in extensions:
        if not isinstance(ext, BackpropExtension):
            raise ValueError(f"register expects BackPACK extension instances, got {ext!r}")
        if not isinstance(ext, SUPPORTED_EXTENSIONS) or isinstance(ext, KFRA):
            raise NotImplementedError(UNSUPPORTED_MESSAGE.format(
                ext=type(ext).__name__, supported=_supported_names()))
        _linear_rule(ext)
        for cls in (AdditiveCoupling, RevMLP):
            ext.set_module_extension(cls, leaf, overwrite=True)
    return extensions


def all_extensions(first_order: bool = True, second_order: bool = True,
                   diag_hessian: bool = False, mc_samples: int = 1) -> list[BackpropExtension]:
    """Fresh, registered instances of the supported extensions, to enable in one call.

    ``with backpack(*all_extensions()):`` computes ``grad_batch``, ``batch_l2``,
    ``sum_grad_squared``, ``variance``, ``diag_ggn_exact``, ``diag_ggn_mc``, ``sqrt_ggn_exact``,
    ``kfac`` and ``kflr`` (plus ``diag_h`` with ``diag_hessian=True``, ReLU/identity blocks).
    """
    exts: list[BackpropExtension] = []
    if first_order:
        exts += [BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()]
    if second_order:
        exts += [DiagGGNExact(), DiagGGNMC(mc_samples=mc_samples), SqrtGGNExact(),
                 KFAC(mc_samples=mc_samples), KFLR()]
    if diag_hessian:
        exts.append(DiagHessian())
    return list(register(*exts))
