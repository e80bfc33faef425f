"""torch's private API used by the drop-in Gauss-Newton step (:mod:`gnrev_plugin.optim.capture`).

Checked against torch 2.14.1 (and 2.15.0).

The drop-in step records which loss is applied to the model output through a thin tensor
subclass, and must not record anything while a functorch transform (``vmap``, ``grad``,
``jacrev``: the metrics and DenseGN's Jacobians) runs the model:

* :data:`DisableTorchFunctionSubclass`: context manager that runs a torch function on the
  subclass's data without re-entering ``__torch_function__``;
* :func:`functorch_transforms_active`: whether a functorch transform is running;
* :func:`is_functorch_wrapped_tensor`: whether a tensor is a functorch wrapper (batched/grad).
"""

from __future__ import annotations

import torch

CHECKED_VERSION = "2.14.1"

__all__ = ["CHECKED_VERSION", "DisableTorchFunctionSubclass", "functorch_transforms_active",
           "is_functorch_wrapped_tensor"]

DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass


def functorch_transforms_active() -> bool:
    """``True`` inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...)."""
    return bool(torch._C._are_functorch_transforms_active())


def is_functorch_wrapped_tensor(t: torch.Tensor) -> bool:
    """``True`` for the wrapper tensors functorch passes through a transformed function."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
