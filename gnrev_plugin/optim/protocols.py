"""What an optimizer of this package can do, declared once: the batch-step protocol and its
capabilities.

Every optimizer here declares a class attribute ``capabilities`` (a ``frozenset`` of the names
below); callers ask :func:`capabilities_of` / :func:`steps_on_batch` / :func:`is_gauss_newton` /
:func:`is_distributed` instead of inferring them from names, ``hasattr`` or ``isinstance``.

* :data:`GAUSS_NEWTON`: the step is the Gauss-Newton step ``Δθ = −α J⁺ ε`` of
  :mod:`gnrev_plugin.optim.targets` (:class:`~gnrev_plugin.optim.ExactGN`,
  :class:`~gnrev_plugin.optim.DenseGN`);
* :data:`BATCH_STEP`: it has ``step_on_batch(x, y) -> loss``, one step on a batch without the
  caller's forward/backward (the GN family and the sharpness regularisers);
* :data:`DISTRIBUTED`: it takes ``process_group=`` and steps on the union of the ranks' batches
  (:mod:`gnrev_plugin.optim.distributed`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

__all__ = ["GAUSS_NEWTON", "BATCH_STEP", "DISTRIBUTED", "CAPABILITIES", "BatchStepOptimizer",
           "capabilities_of", "steps_on_batch", "is_gauss_newton", "is_distributed"]

GAUSS_NEWTON = "gauss_newton"
BATCH_STEP = "batch_step"
DISTRIBUTED = "distributed"
#: Every capability name an optimizer may declare.
CAPABILITIES = frozenset({GAUSS_NEWTON, BATCH_STEP, DISTRIBUTED})


@runtime_checkable
class BatchStepOptimizer(Protocol):
    """An optimizer that steps on a batch itself (declares :data:`BATCH_STEP`).

    Attributes:
        capabilities: the subset of :data:`CAPABILITIES` the class supports.
    """

    capabilities: ClassVar[frozenset[str]]

    def step_on_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on the batch ``(x, y)``.

        Args:
            x: the inputs.
            y: the loss's targets (class indices for cross-entropy, ``(B, C)`` for MSE).

        Returns:
            The mean-reduced loss on ``(x, y)`` before the step.
        """
        ...


def capabilities_of(optimizer: Any) -> frozenset[str]:
    """The capabilities an optimizer (instance or class) declares; empty for any other object.

    Args:
        optimizer: an optimizer or optimizer class (a ``torch.optim`` one declares none).

    Returns:
        Its ``capabilities`` attribute as a ``frozenset`` (``frozenset()`` when absent).
    """
    return frozenset(getattr(optimizer, "capabilities", ()) or ())


def steps_on_batch(optimizer: Any) -> bool:
    """Whether ``optimizer`` declares :data:`BATCH_STEP` (has ``step_on_batch(x, y)``).

    Args:
        optimizer: an optimizer or optimizer class.

    Returns:
        ``True`` if the runner may call ``optimizer.step_on_batch(x, y)``.
    """
    return BATCH_STEP in capabilities_of(optimizer)


def is_gauss_newton(optimizer: Any) -> bool:
    """Whether ``optimizer`` declares :data:`GAUSS_NEWTON`.

    Args:
        optimizer: an optimizer or optimizer class.

    Returns:
        ``True`` for the exact Gauss-Newton family.
    """
    return GAUSS_NEWTON in capabilities_of(optimizer)


def is_distributed(optimizer: Any) -> bool:
    """Whether ``optimizer`` declares :data:`DISTRIBUTED` (takes ``process_group=``).

    Args:
        optimizer: an optimizer or optimizer class.

    Returns:
        ``True`` if it steps on the union of the ranks' batches.
    """
    return DISTRIBUTED in capabilities_of(optimizer)
