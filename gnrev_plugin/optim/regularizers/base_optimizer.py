"""The base optimizer a sharpness regulariser hands its direction to, built on shared groups.

The core takes the base as a ``torch.optim.Optimizer`` subclass or a factory
``factory(param_groups, **options) -> Optimizer``; registry names (``"gnrev.sgd"``) are resolved
by the layer above (the registry's regulariser entries, :func:`gnrev_plugin.build.build_optimizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..protocols import steps_on_batch

__all__ = ["BaseFactory", "build_base", "base_name"]

#: ``factory(param_groups, **options)`` returning a ``torch.optim.Optimizer`` on those groups.
BaseFactory = Callable[..., torch.optim.Optimizer]


def base_name(base: BaseFactory) -> str:
    """How a base is named in messages and in ``base_name``: a factory's ``base_name`` attribute
    (e.g. the registry name ``"gnrev.sgd"``), else ``module.QualifiedName``.

    Args:
        base: a ``torch.optim.Optimizer`` subclass or a factory.

    Returns:
        Its name.
    """
    name = getattr(base, "base_name", None)
    if isinstance(name, str):
        return name
    return f"{getattr(base, '__module__', '?')}.{getattr(base, '__qualname__', type(base).__name__)}"


def build_base(base: BaseFactory, groups: list[dict], base_kwargs: Mapping
               ) -> torch.optim.Optimizer:
    """The base optimizer on ``groups`` (shared, not copied).

    Args:
        base: a ``torch.optim.Optimizer`` subclass or a factory ``(param_groups, **options)``.
        groups: the regulariser's ``param_groups`` (the base must keep these very dicts).
        base_kwargs: the base's options.

    Returns:
        The base optimizer.

    Raises:
        TypeError: ``base`` is a name or not callable, it steps on batches itself, or it copied
            the groups. ValueError: it rejected ``base_kwargs``.
    """
    if isinstance(base, str) or not callable(base):
        raise TypeError("base must be a torch.optim.Optimizer subclass or a factory "
                        f"(param_groups, **options) -> Optimizer, got {base!r}; registry names "
                        "such as 'gnrev.sgd' are resolved by the registry (build_optimizer("
                        "'gnrev.sam', model, {'base': 'gnrev.sgd'}))")
    shown = repr(base.base_name) if isinstance(getattr(base, "base_name", None), str) \
        else getattr(base, "__name__", repr(base))
    try:
        opt = base(groups, **base_kwargs)
    except TypeError as err:
        raise ValueError(f"base optimizer {shown} rejected base_kwargs "
                         f"{dict(base_kwargs)}: {err}") from err
    if not isinstance(opt, torch.optim.Optimizer) or steps_on_batch(opt):
        raise TypeError(f"base optimizer {shown} must be a torch.optim.Optimizer that steps from "
                        f"p.grad, got {type(opt).__name__}")
    if len(opt.param_groups) != len(groups) or any(
            a is not b for a, b in zip(opt.param_groups, groups, strict=True)):
        raise TypeError(f"base optimizer {type(opt).__name__} copied its parameter groups; the "
                        "wrapper needs them shared (torch.optim.Optimizer's behaviour)")
    return opt
