"""``torch.nn.Module`` internals read by the core (:mod:`gnrev_plugin.nn`, :mod:`gnrev_plugin.metrics`).

Checked against torch 2.14.1 (:data:`CHECKED_VERSION`, as :mod:`gnrev_plugin.compat.torch`).

* :func:`compiled_original`: the module a ``torch.compile`` wrapper
  (``torch._dynamo.eval_frame.OptimizedModule``) wraps, kept in its ``_orig_mod`` attribute;
* :func:`installed_hooks`: the forward and (non-full) backward hooks registered on a module,
  kept in its ``_forward_hooks`` / ``_backward_hooks`` ordered dicts (torch has no public way to
  list them).
"""

from __future__ import annotations

from torch import nn

CHECKED_VERSION = "2.14.1"

__all__ = ["CHECKED_VERSION", "compiled_original", "installed_hooks"]


def compiled_original(wrapper: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper wraps (its ``_orig_mod``).

    Args:
        wrapper: an ``OptimizedModule`` (see :func:`gnrev_plugin.compat.torch.compiled_module_type`).

    Returns:
        The wrapped module (itself possibly another wrapper).
    """
    return wrapper._orig_mod


def installed_hooks(module: nn.Module) -> list:
    """The forward and backward hooks registered directly on ``module``.

    Args:
        module: any ``nn.Module``.

    Returns:
        The hook callables, forward hooks first, in registration order.
    """
    return [*module._forward_hooks.values(), *module._backward_hooks.values()]
