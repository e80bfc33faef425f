"""The registry's factories for the sharpness regularisers (:mod:`gnrev_plugin.optim.regularizers`).

The core takes a base optimizer as a class or factory; this layer resolves a registered name
(``base="gnrev.sgd"``) into such a factory, with the entry's defaults, so the core never imports
the registry. :mod:`gnrev_plugin.registry.builtin` registers ``gnrev.sam`` ... through these.
"""

from __future__ import annotations

import functools
from typing import Any

from ..optim import regularizers
from ..optim.regularizers.base_optimizer import BaseFactory
from .discovery import get_registry
from .registry import Registry

__all__ = ["registry_base", "SAM", "PSAM", "WeightNoise", "HessianTracePenalty",
           "GNTracePenalty"]


def registry_base(name: str, registry: Registry | None = None) -> BaseFactory:
    """A base-optimizer factory for the registered optimizer ``name`` (with its defaults).

    Args:
        name: a registered optimizer name (``"gnrev.sgd"``, ``"adam"``...).
        registry: the registry (default: the global one).

    Returns:
        ``factory(param_groups, **options)`` building it; ``factory.base_name`` is the full name.

    Raises:
        UnknownNameError: no such optimizer. ValueError: it needs the model or the loss (a GN
            optimizer or another regulariser cannot be a base).
    """
    reg = registry if registry is not None else get_registry()
    full = reg.resolve_name("optimizer", name)
    entry = reg.entry("optimizer", full)
    if entry.needs:
        raise ValueError(f"base optimizer {full!r} needs {list(entry.needs)}: the base must "
                         "be a plain optimizer that steps from p.grad (e.g. gnrev.sgd, "
                         "gnrev.adam)")

    def factory(groups: list[dict], **options: Any):
        return reg.get_optimizer(full, groups, **options)

    factory.base_name = full
    return factory


def _with_registry_base(cls: type) -> Any:
    """``cls`` whose ``base`` may also be a registry name (resolved by :func:`registry_base`)."""

    @functools.wraps(cls, updated=())
    def build(params, *args: Any, base: Any = "gnrev.sgd", **kwargs: Any):
        if isinstance(base, str):
            base = registry_base(base)
        return cls(params, *args, base=base, **kwargs)

    build.capabilities = cls.capabilities     # what the built optimizer declares
    return build


SAM = _with_registry_base(regularizers.SAM)
PSAM = _with_registry_base(regularizers.PSAM)
WeightNoise = _with_registry_base(regularizers.WeightNoise)
HessianTracePenalty = _with_registry_base(regularizers.HessianTracePenalty)
GNTracePenalty = _with_registry_base(regularizers.GNTracePenalty)
