"""How a drop-in optimizer finds the model behind the parameters it was given.

Runners such as DeepOBS and AlgoPerf construct optimizers as ``optimizer_class(model.parameters(),
**hyperparameters)``. The Gauss-Newton optimizers also need the model (its forward pass, and for
:class:`~gnrev_plugin.optim.ExactGN` the reversible structure), so when ``model=`` is not passed
they look it up with :func:`find_module_owning`, the package's one discovery mechanism:

* scan the live ``nn.Module`` objects of class ``cls`` (Python's garbage collector tracks them
  all, so deep copies, unpickled models and models built by third-party code are found alike);
* keep those whose parameters include every given parameter;
* among them take the ones with the fewest parameters, and of those the outermost (a wrapper
  that adds no parameters, such as ``nn.Sequential(model)`` or DDP's ``.module`` holder, is
  preferred over the module it wraps, so its forward — the one the training loop calls — is
  the one the step uses);
* exactly one must remain, else ``ValueError`` asks for ``model=...``.

A ``torch.compile(model)`` wrapper (``OptimizedModule``) is never the answer: it is replaced by the
module it wraps (:func:`unwrap_compiled`), whose eager forward the optimizer's own passes use. The
same scan remembers the live wrappers (weakly), and the capture of the drop-in step hooks those of
its model (:func:`compiled_wrappers_of`) to see the training loop's compiled calls eagerly. (A
scan of the heap costs tens of milliseconds, so only discovery, which scans anyway, does it.)

Passing ``model=`` explicitly always wins and costs nothing; the registry's runners
(:func:`gnrev_plugin.build.build_optimizer`) always do.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from ..compat.torch import compiled_module_type
from ..compat.torch_nn import compiled_original

__all__ = ["find_module_owning", "unwrap_compiled", "compiled_wrappers_of"]


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile`` wrappers: ``module._orig_mod`` (repeatedly) for an
    ``OptimizedModule``, ``module`` itself otherwise.

    Args:
        module: Any module.

    Returns:
        The eager module.
    """
    cls = compiled_module_type()
    while cls is not None and isinstance(module, cls):
        module = compiled_original(module)
    return module


def compiled_wrappers_of(module: nn.Module, *, scan: bool = False) -> list[nn.Module]:
    """The ``torch.compile`` wrappers (``OptimizedModule``) whose ``_orig_mod`` is ``module``
    (directly or through further wrappers), among the live ones the last discovery scan
    (:func:`find_module_owning`) saw, or, with ``scan=True``, among all live ones (a heap scan).
    ``[]`` while Dynamo is not imported.

    Args:
        module: The eager module.
        scan: Scan the heap for all live wrappers.

    Returns:
        The wrappers.
    """
    cls = compiled_module_type()
    if cls is None:
        return []
    wrappers = _live_instances(cls) if scan else list(_SEEN_WRAPPERS)
    return [w for w in wrappers if unwrap_compiled(w) is module]


#: The live ``torch.compile`` wrappers seen by the last :func:`find_module_owning` scan.
_SEEN_WRAPPERS: weakref.WeakSet = weakref.WeakSet()


def _live_instances(cls: type | tuple[type, ...], also: type | None = None) -> list:
    """The objects the garbage collector tracks whose type is ``cls`` or a subclass (by
    ``type``, so dead weak proxies, whose ``isinstance`` raises, are skipped). With ``also``,
    instances of ``also`` are excluded and remembered in ``_SEEN_WRAPPERS`` (same pass)."""
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        objs = [m for m in gc.get_objects() if issubclass(type(m), cls)]
    if also is None:
        return objs
    seen = [m for m in objs if isinstance(m, also)]
    _SEEN_WRAPPERS.clear()
    _SEEN_WRAPPERS.update(seen)
    return [m for m in objs if not isinstance(m, also)]


def find_module_owning(params: Iterable[torch.Tensor], cls: type[nn.Module] = nn.Module,
                       what: str = "module") -> nn.Module:
    """The outermost smallest live ``cls`` instance whose parameters include all of ``params``
    (see the module docstring; never a ``torch.compile`` wrapper, see :func:`unwrap_compiled`).
    ``what`` names the model kind in the error message.

    Args:
        params: Tensors that must all belong to the module.
        cls: Module class to look for.
        what: Name of the model kind in error messages.

    Returns:
        The owning module.

    Raises:
        ValueError: If no live module owns all of ``params``, or more than one outermost does.
    """
    ids = {id(p) for p in params}
    compiled = compiled_module_type()
    if compiled is None:
        live = _live_instances(cls)
    elif issubclass(compiled, cls):
        live = _live_instances(cls, also=compiled)
    else:   # e.g. cls=RevMLP: collect the wrappers in the same pass
        live = _live_instances((cls, compiled), also=compiled)
    cands = [m for m in live if ids and ids <= {id(p) for p in m.parameters()}]
    if not cands:
        raise ValueError(f"no live {what} owns all of the given parameters; pass model=... to "
                         "the optimizer")
    size = min(sum(1 for _ in m.parameters()) for m in cands)
    smallest = [m for m in cands if sum(1 for _ in m.parameters()) == size]
    outer = [m for m in smallest
             if not any(o is not m and any(c is m for c in o.modules()) for o in smallest)]
    if len(outer) != 1:
        raise ValueError(f"{len(outer)} live {what}s own all of the given parameters; pass "
                         "model=... to the optimizer")
    return outer[0]
