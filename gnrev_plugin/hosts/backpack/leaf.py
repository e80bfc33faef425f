r"""The BackPACK module extension for gnrev's leaf modules, and per-instance registration.

Each inner ``nn.Linear`` :math:`u = s W^\top + b` of a coupling block gets its quantity from
**BackPACK's own nn.Linear rule** of the same extension, evaluated with input
:math:`s = \sigma(Z C)` and the output quantity :math:`V_u` pulled back by
:mod:`~gnrev_plugin.hosts.backpack.pullback` (e.g. ``DiagGGNExact``:
:math:`\operatorname{diag}_W = \sum_{k,n} (V_u[k,n] \otimes s[n])^{\odot 2}`; ``KFAC``:
:math:`[\sum_{k,n} V_u V_u^\top,\; s^\top s / N]`), so conventions (scaling, savefields,
subsampling) are BackPACK's. :math:`V_X` is stored for the block input, so blocks compose with any
BackPACK-supported module before them.

``KFRA`` raises ``NotImplementedError`` naming the extension (its batch-averaged backpropagation
has no transposed-Jacobian form here), and :func:`register` refuses extensions that have no
``nn.Linear`` rule (e.g. the ``curvmatprod`` ones).
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

from ...compat.backpack import module_extensions
from ...nn import AdditiveCoupling, RevMLP
from .diag_hessian import compress, residual_factors
from .pullback import _inner_io, _map, _Pullback

#: Extensions :func:`register` accepts (all of BackPACK's with an ``nn.Linear`` rule and a
#: transposed-Jacobian backpropagation).
SUPPORTED_EXTENSIONS: tuple[type[BackpropExtension], ...] = (
    BatchGrad, BatchL2Grad, SumGradSquared, Variance,
    DiagGGNExact, DiagGGNMC, BatchDiagGGNExact, BatchDiagGGNMC, SqrtGGNExact, SqrtGGNMC,
    KFAC, KFLR, DiagHessian, BatchDiagHessian,
)
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



class CouplingLeafExtension(ModuleExtension):
    """One BackPACK module extension for :class:`AdditiveCoupling` and :class:`RevMLP` leaves.

    It replaces :meth:`ModuleExtension.__call__`: fetch the quantity BackPACK stored for the
    leaf's output, pull it back block by block (the readout ``U`` first, for a RevMLP),
    evaluate the extension's own ``nn.Linear`` rule on every inner layer and store the result on
    its parameters, then store the quantity for the leaf's input. For ``DiagHessian`` and
    ``BatchDiagHessian`` the pulled-back factor lists gain the ``σ''`` residuals of
    :func:`residual_factors` and are kept short by :func:`compress`.
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
    def _check(ext: BackpropExtension, x: Tensor) -> None:
        name = type(ext).__name__
        if x.dim() != 2:
            raise NotImplementedError(f"{name} on AdditiveCoupling supports inputs (N, d) only, "
                                      f"got shape {tuple(x.shape)}")
        if isinstance(ext, KFRA):
            raise NotImplementedError(UNSUPPORTED_MESSAGE.format(ext=name,
                                                                 supported=_supported_names()))

    def __call__(self, ext: BackpropExtension, module: nn.Module, g_inp, g_out) -> None:
        blocks, x = self._blocks_and_input(module)
        self._check(ext, x)
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
                xs = xin if sub is None else xin[sub]
                pull = _Pullback(b, xs)
                if isinstance(bp, dict):  # DiagHessian: signed lists of square-root factors
                    bp_f, bp_g, bp = self._pull_diag_hessian(b, xs, inputs[idx + 1], pull, bp,
                                                             g_f, g_g, sub)
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
    def _pull_diag_hessian(block: AdditiveCoupling, xs: Tensor, y: Tensor, pull: _Pullback,
                           bp: dict, g_f: Tensor, g_g: Tensor, sub) -> tuple[dict, dict, dict]:
        """Pull DiagHessian's signed lists back through one block, adding the ``σ''`` residuals.

        ``bp`` holds factors of the output Hessian ``H_Y``. Returned: the lists for ``u_f``,
        ``u_g`` and the block input ``X``:

        * ``H_{u_g} = [H_Y]_{Y2 Y2}``;
        * ``H_{u_f} = J_{Y,u_f}ᵀ H_Y J_{Y,u_f} + R_g`` with ``R_g`` the ``g`` residual at ``Y1``
          (:func:`residual_factors` with ``γ = ∂L/∂u_g``); a factor ``F`` at ``Y1`` pulls back
          exactly like the output factor ``[F, 0]`` (it reaches ``u_f`` and ``X`` through ``Y1``
          and nothing reaches ``u_g``);
        * ``H_X = J_Xᵀ H_Y J_X + [R_g pulled back to X] + [0, R_f]`` with ``R_f`` the ``f``
          residual at ``X2`` (``γ = ∂L/∂u_f``).
        """
        half = block.half
        y1 = block.split(y if sub is None else y[sub])[0]
        x2 = block.split(xs)[1]
        gf, gg = (g_f, g_g) if sub is None else (g_f[sub], g_g[sub])
        res_g = residual_factors(block.g, y1, gg)
        res_f = residual_factors(block.f, x2, gf)
        lists: list[list[Tensor]] = [[], [], []]
        signs: list[list[float]] = [[], [], []]
        for m, sign in zip(bp["matrices"], bp["signs"], strict=True):
            for i, t in enumerate(pull(m)):
                lists[i].append(t)
                signs[i].append(sign)
        for F, sign in res_g:                                  # at Y1: reaches u_f and X
            F_u, _, F_x = pull(torch.cat([F, F.new_zeros(F.shape)], dim=-1))
            for i, t in ((0, F_u), (2, F_x)):
                lists[i].append(t)
                signs[i].append(sign)
        for F, sign in res_f:                                  # at X2: reaches X only
            lists[2].append(torch.cat([F.new_zeros(*F.shape[:-1], half), F], dim=-1))
            signs[2].append(sign)
        return tuple(compress({"matrices": lst, "signs": sg})
                     for lst, sg in zip(lists, signs, strict=True))

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

    Args:
        *extensions: BackPACK extension instances.

    Returns:
        The same instances.
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
    ``kfac`` and ``kflr`` (plus ``diag_h`` with ``diag_hessian=True``).

    Args:
        first_order: Include ``BatchGrad``, ``BatchL2Grad``, ``SumGradSquared``, ``Variance``.
        second_order: Include ``DiagGGNExact``, ``DiagGGNMC``, ``SqrtGGNExact``, ``KFAC``, ``KFLR``.
        diag_hessian: Include ``DiagHessian``.
        mc_samples: Monte-Carlo samples of ``DiagGGNMC`` and ``KFAC``.

    Returns:
        The registered instances.
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
