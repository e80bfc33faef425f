"""torch's private API used by the drop-in Gauss-Newton step (:mod:`gnrev_plugin.optim.capture`).

Checked against torch 2.14.1 (and 2.15.0).

The drop-in step records which loss is applied to the model output through a thin tensor
subclass, and must not record anything while a functorch transform (``vmap``, ``grad``,
``jacrev``: the metrics and DenseGN's Jacobians) runs the model:

* :data:`DisableTorchFunctionSubclass`: context manager that runs a torch function on the
  subclass's data without re-entering ``__torch_function__``;
* :func:`functorch_transforms_active`: whether a functorch transform is running;
* :func:`is_functorch_wrapped_tensor`: whether a tensor is a functorch wrapper (batched/grad).

For ``torch.compile``'d models (:mod:`gnrev_plugin.nn.discovery`, :mod:`~gnrev_plugin.optim.capture`):

* :func:`compiled_module_type`: the class of the wrapper ``torch.compile(module)`` returns
  (``torch._dynamo.eval_frame.OptimizedModule``, whose ``_orig_mod`` is the wrapped module), or
  ``None`` while Dynamo is not imported (then no such wrapper can exist; importing it costs seconds).

For the optimizers' caches (:mod:`gnrev_plugin.optim`): :func:`tensor_version`, the in-place
modification counter ``Tensor._version``.
"""

from __future__ import annotations

import sys

import torch

CHECKED_VERSION = "2.14.1"

__all__ = ["CHECKED_VERSION", "DisableTorchFunctionSubclass", "functorch_transforms_active",
           "is_functorch_wrapped_tensor", "compiled_module_type", "tensor_version"]

DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass


def functorch_transforms_active() -> bool:
    """``True`` inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...).

    Returns:
        Whether a ``torch.func`` transform is active.
    """
    return bool(torch._C._are_functorch_transforms_active())


def is_functorch_wrapped_tensor(t: torch.Tensor) -> bool:
    """``True`` for the wrapper tensors functorch passes through a transformed function.

    Args:
        t: A tensor.

    Returns:
        Whether ``t`` is a functorch wrapper.
    """
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def compiled_module_type() -> type | None:
    """``torch._dynamo.eval_frame.OptimizedModule`` if Dynamo is imported, else ``None``.

    Instances wrap the compiled module as ``._orig_mod``; their own ``__call__`` (and forward hooks)
    run eagerly, the wrapped module's ``__call__`` runs inside the compiled region.

    Returns:
        The ``OptimizedModule`` class, or ``None``.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return None if eval_frame is None else getattr(eval_frame, "OptimizedModule", None)


def tensor_version(t: torch.Tensor) -> int:
    """The in-place modification counter ``Tensor._version`` (private; checked against torch
    2.14.1): it grows by at least one with every in-place write, so ``(id, data_ptr, version)``
    keys a cache entry that must not survive a change of the tensor's values.

    Args:
        t: any tensor.

    Returns:
        Its current version counter.
    """
    return t._version
