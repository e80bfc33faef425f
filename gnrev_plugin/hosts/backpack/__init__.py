r"""BackPACK adapter: the additive coupling block and the RevMLP as BackPACK leaf modules.

Usage (copy-paste)::

    from gnrev_plugin.hosts.backpack import enable
    enable()          # every BackPACK extension instance, anywhere (Cockpit's too), now handles
                      # AdditiveCoupling/RevMLP; disable() undoes it

or, per instance::

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
and ``torch.cat``, which are not modules. So the block (and the whole
:class:`~gnrev_plugin.nn.RevMLP`, whose readout :math:`F = X^{(L)} U` is a plain matmul) is one
leaf: its parts carry ``_backpack_extend = True`` and are not hooked by ``backpack.extend``, and
:func:`register` gives
each extension a module extension for :class:`~gnrev_plugin.nn.AdditiveCoupling` and
:class:`~gnrev_plugin.nn.RevMLP`.

One concept per module:

* :mod:`~gnrev_plugin.hosts.backpack.pullback`: the block's exact transposed Jacobians
  (``torch.func.vjp`` on its functional forward);
* :mod:`~gnrev_plugin.hosts.backpack.diag_hessian`: the :math:`\sigma''` residuals and the exact
  compression of ``DiagHessian``'s signed factor lists;
* :mod:`~gnrev_plugin.hosts.backpack.leaf`: :class:`CouplingLeafExtension`, :func:`register`,
  :func:`all_extensions`;
* :mod:`~gnrev_plugin.hosts.backpack.process_wide`: :func:`enable`, :func:`disable`,
  :func:`is_enabled`, :func:`enabled`.

Never hand an ``extend``-ed module or loss to curvlinops (functorch cannot trace BackPACK's
backward hooks): extend a ``copy.deepcopy`` of the model.
"""

from __future__ import annotations

from .diag_hessian import compress, residual_factors, second_derivative
from .leaf import SUPPORTED_EXTENSIONS, UNSUPPORTED_MESSAGE, CouplingLeafExtension, all_extensions, register
from .process_wide import disable, enable, enabled, is_enabled

__all__ = ["register", "all_extensions", "enable", "disable", "is_enabled", "enabled",
           "SUPPORTED_EXTENSIONS", "CouplingLeafExtension", "UNSUPPORTED_MESSAGE",
           "compress", "residual_factors", "second_derivative"]
