"""Process-wide set-up: every BackPACK extension instance handles gnrev's leaf modules.

:func:`enable` makes *every* BackPACK extension instance, including the ones a tool such as
Cockpit creates internally, use :class:`~.leaf.CouplingLeafExtension` for
:class:`~gnrev_plugin.nn.AdditiveCoupling`/:class:`~gnrev_plugin.nn.RevMLP` (unless the instance
has its own entry for them), and runs BackPACK's ``extension_hook`` (Cockpit's per-parameter
hooks) on the inner ``nn.Linear`` s of a leaf instead of on the leaf itself. :func:`disable` undoes
both. Both are idempotent and guarded by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from backpack.extensions import KFRA
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import nn

from ...compat import backpack as _compat
from ...nn import AdditiveCoupling, RevMLP
from .leaf import SUPPORTED_EXTENSIONS, CouplingLeafExtension

_LEAF_CLASSES = (AdditiveCoupling, RevMLP)
_STATE_LOCK = threading.Lock()
_uninstallers: list[Callable[[], None]] = []
_FALLBACK_LEAF = CouplingLeafExtension()


def _fallback(ext: BackpropExtension, module: nn.Module) -> ModuleExtension | None:
    """The leaf rule for a gnrev leaf module; ``None`` (BackPACK decides) for anything else, and
    for an extension gnrev cannot support whose fail mode is not ``"ERROR"`` (it keeps warning
    or skipping as it did before :func:`enable`)."""
    if not isinstance(module, _LEAF_CLASSES):
        return None
    supported = isinstance(ext, SUPPORTED_EXTENSIONS) and not isinstance(ext, KFRA)
    if not supported and _compat.fail_mode(ext) != "ERROR":
        return None
    return _FALLBACK_LEAF  # raises NotImplementedError naming an unsupported extension


def _inner_parameter_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The childless modules with parameters inside a gnrev leaf (its inner ``nn.Linear`` s)."""
    for m in module.modules():
        if m is not module and not any(True for _ in m.children()) \
                and any(True for _ in m.parameters(recurse=False)):
            yield m


def _dispatch_hook(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """BackPACK's ``extension_hook``, run on the inner ``nn.Linear`` s of a gnrev leaf (whose
    quantities the leaf extension stored) instead of on the leaf; unchanged on other modules.
    Cockpit's hooks skip modules with children, so without this they would never see the
    RevMLP's parameters."""
    def dispatched(module: nn.Module) -> None:
        if isinstance(module, _LEAF_CLASSES):
            for inner in _inner_parameter_modules(module):
                hook(inner)
        else:
            hook(module)
    return dispatched


def enable() -> None:
    """Make every BackPACK extension instance handle gnrev's leaf modules, process-wide.

    After ``enable()``, any ``BackpropExtension`` instance, created before or after and by any
    tool (Cockpit builds its own), runs :class:`CouplingLeafExtension` on
    :class:`~gnrev_plugin.nn.AdditiveCoupling` and :class:`~gnrev_plugin.nn.RevMLP` modules
    unless the instance has its own entry for them (``set_module_extension`` or
    :func:`register` win), and BackPACK's ``extension_hook`` runs on the leaves' inner
    ``nn.Linear`` s. Unsupported extensions whose fail mode is ``"ERROR"`` raise
    ``NotImplementedError`` naming them; with ``"WARNING"``/``"SILENT"`` they behave as before.

    Idempotent (a second call does nothing) and thread-safe (a lock guards the switch); one
    :func:`disable` undoes it. The state is per process.

    Raises:
        RuntimeError: if the installed BackPACK lacks the structures this relies on
            (:func:`gnrev_plugin.compat.backpack.check_version`).
    """
    with _STATE_LOCK:
        if _uninstallers:
            return
        _compat.check_version()
        _uninstallers.append(_compat.install_module_extension_fallback(_fallback))
        _uninstallers.append(_compat.install_extension_hook_wrapper(_dispatch_hook))


def disable() -> None:
    """Undo :func:`enable` (idempotent; instances set up with :func:`register` keep their
    entries)."""
    with _STATE_LOCK:
        while _uninstallers:
            _uninstallers.pop()()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect.

    Returns:
        ``True`` between :func:`enable` and :func:`disable`.
    """
    return bool(_uninstallers)


@contextmanager
def enabled() -> Iterator[None]:
    """``with enabled():`` — :func:`enable` for the body, then back to the previous state.

    Yields:
        ``None``; :func:`enable` is in effect inside the ``with`` body.
    """
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()
