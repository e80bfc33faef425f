"""BackPACK's private API used by :mod:`gnrev_plugin.hosts.backpack`.

Checked against ``backpack-for-pytorch`` 1.7.1 (:data:`CHECKED_VERSION`; :func:`check_version`
verifies that the installed release still has every structure below and warns when its version
differs).

* :func:`module_extensions`: a ``BackpropExtension`` keeps its ``{module class: ModuleExtension}``
  table in the name-mangled attribute ``_BackpropExtension__module_extensions``; gnrev reads it
  to reuse BackPACK's own ``nn.Linear`` rules inside the coupling blocks, and to let an entry a
  user set with ``set_module_extension`` win over the process-wide fallback.
* :func:`fail_mode`: the extension's ``_fail_mode`` (``"ERROR"``, ``"WARNING"``, ``"SILENT"``).
* :func:`opt_out_of_extend`: ``backpack.extend`` skips (installs no hooks on) a module whose
  ``_backpack_extend`` attribute is already true; the RevMLP's coupling parts set it so that a
  coupling block is one BackPACK leaf whose module extension lives in
  :mod:`gnrev_plugin.hosts.backpack`. Setting it imports nothing from BackPACK.
* :func:`install_module_extension_fallback`: wraps ``BackpropExtension.__call__`` (which looks the
  module's class up in that table and runs the module extension) so that a module class missing
  from an instance's table is offered to a fallback first. This is how
  :func:`gnrev_plugin.hosts.backpack.enable` reaches extension instances that gnrev never sees
  (Cockpit creates its own).
* :func:`install_extension_hook_wrapper`: wraps ``backpack.context.CTX.get_extension_hook`` (read
  by BackPACK's backward hook after all extensions ran on a module), so that the hook can be
  redirected from a leaf module to the parameter-owning modules inside it.

Both installers return an ``uninstall`` callable that restores the original attribute.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

CHECKED_VERSION = "1.7.1"

__all__ = ["CHECKED_VERSION", "module_extensions", "fail_mode", "opt_out_of_extend",
           "installed_version", "check_version", "install_module_extension_fallback",
           "install_extension_hook_wrapper"]

_TABLE = "_BackpropExtension__module_extensions"
_WRAPPED = "__gnrev_wrapped__"


def module_extensions(extension: Any) -> dict:
    """The ``{module class: ModuleExtension}`` table of a BackPACK extension instance (empty if
    the attribute is missing, e.g. after a BackPACK release renamed it).

    Args:
        extension: A BackPACK extension instance.

    Returns:
        The table (the instance's own dict, not a copy).
    """
    return getattr(extension, _TABLE, {})


def fail_mode(extension: Any) -> str:
    """What the extension does for a module class it has no rule for (``"ERROR"`` if unknown).

    Args:
        extension: A BackPACK extension instance.

    Returns:
        ``"ERROR"``, ``"WARNING"`` or ``"SILENT"``.
    """
    return getattr(extension, "_fail_mode", "ERROR")


def opt_out_of_extend(module: Any) -> None:
    """Make ``backpack.extend`` leave ``module`` alone (no hooks): set its ``_backpack_extend``.

    Args:
        module: an ``nn.Module`` whose gradients BackPACK handles through an enclosing module's
            extension.
    """
    module._backpack_extend = True


def installed_version() -> str | None:
    """The installed ``backpack-for-pytorch`` version (``None`` if not installed).

    Returns:
        The version string, or ``None``.
    """
    try:
        return metadata.version("backpack-for-pytorch")
    except metadata.PackageNotFoundError:
        return None


def check_version() -> None:
    """Check that the private structures used here exist; warn if the version is not the one
    checked.

    Raises:
        RuntimeError: if ``BackpropExtension`` no longer keeps its table under the mangled name,
            or ``CTX`` has no ``get_extension_hook``.
    """
    from backpack.context import CTX
    from backpack.extensions import BatchGrad

    version = installed_version()
    problems = []
    if _TABLE not in vars(BatchGrad()):
        problems.append(f"BackpropExtension has no attribute {_TABLE}")
    if not callable(getattr(CTX, "get_extension_hook", None)):
        problems.append("backpack.context.CTX has no get_extension_hook()")
    if problems:
        raise RuntimeError(f"backpack-for-pytorch {version} is incompatible with gnrev's BackPACK "
                           f"adapter (checked against {CHECKED_VERSION}): " + "; ".join(problems))
    if version != CHECKED_VERSION:
        warnings.warn(f"gnrev's BackPACK adapter was checked against backpack-for-pytorch "
                      f"{CHECKED_VERSION}; {version} is installed", RuntimeWarning, stacklevel=3)


def install_module_extension_fallback(
    fallback: Callable[[Any, Any], Any | None],
) -> Callable[[], None]:
    """Make every ``BackpropExtension`` instance consult ``fallback(extension, module)`` for a
    module whose class is not in the instance's own table.

    ``fallback`` returns a ``ModuleExtension`` to run (``module_extension(extension, module,
    g_inp, g_out)``) or ``None`` to defer to BackPACK (which then raises, warns or skips
    according to the extension's fail mode). Entries in an instance's table always win.

    Returns:
        ``uninstall()``, restoring ``BackpropExtension.__call__``.
    """
    from backpack.extensions.backprop_extension import BackpropExtension

    original = BackpropExtension.__dict__["__call__"]

    def __call__(self, module, g_inp, g_out):
        if module.__class__ not in module_extensions(self):
            rule = fallback(self, module)
            if rule is not None:
                rule(self, module, g_inp, g_out)
                return
        original(self, module, g_inp, g_out)

    __call__.__doc__ = original.__doc__
    setattr(__call__, _WRAPPED, original)
    BackpropExtension.__call__ = __call__

    def uninstall() -> None:
        if BackpropExtension.__dict__.get("__call__") is __call__:
            BackpropExtension.__call__ = original

    return uninstall


def install_extension_hook_wrapper(
    wrap: Callable[[Callable], Callable],
) -> Callable[[], None]:
    """Make ``CTX.get_extension_hook()`` return ``wrap(hook)`` for the hook a ``backpack(...,
    extension_hook=hook)`` context set (``wrap`` is applied once: a hook carrying the attribute
    ``__gnrev_wrapped__`` is returned as is, so the save/restore of nested contexts does not
    stack wrappers).

    Returns:
        ``uninstall()``, restoring ``CTX.get_extension_hook`` and unwrapping the current hook.
    """
    from backpack.context import CTX

    original = CTX.__dict__["get_extension_hook"]

    def get_extension_hook():
        hook = original.__func__()
        if getattr(hook, _WRAPPED, None) is not None:
            return hook
        wrapped = wrap(hook)
        setattr(wrapped, _WRAPPED, hook)
        return wrapped

    CTX.get_extension_hook = staticmethod(get_extension_hook)

    def uninstall() -> None:
        if CTX.__dict__.get("get_extension_hook").__func__ is get_extension_hook:
            CTX.get_extension_hook = original
        current = original.__func__()
        inner = getattr(current, _WRAPPED, None)
        if inner is not None:
            CTX.set_extension_hook(inner)

    return uninstall
