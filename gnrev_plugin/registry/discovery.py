"""Plugin discovery: every plugin of the ``gnrev.plugins`` entry-point group, through pluggy.

Discovery goes through :func:`importlib.metadata.entry_points` (group :data:`ENTRY_POINT_GROUP`);
gnrev-plugin itself registers its built-ins through that same group
(``gnrev = "gnrev_plugin.registry.builtin"``), so first- and third-party plugins are treated
alike, except that the package's own plugin is processed first and therefore owns the
``gnrev.*`` names.

Robustness contract: a plugin that fails to import (any exception, ``SystemExit`` included: a
plugin calling ``sys.exit()`` at import must not take the host down), implements an unknown
hook, raises inside a hook, or registers a name that another distribution already registered is
**reported and skipped** (all of its entries are rolled back); the host keeps working (only
:class:`KeyboardInterrupt` propagates). The report is :attr:`Registry.problems` (``gnrev list``
prints it) and a :class:`PluginWarning` per problem;
``discover(strict=True)`` raises instead.
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pluggy

from .contracts import KINDS
from .errors import DuplicateNameError, PluginError, PluginWarning
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, GnrevHookSpecs
from .registry import _MANUAL, PluginProblem, PluginSource, Registry

__all__ = ["discover", "get_registry"]

_BUILTIN_MODULE = "gnrev_plugin.registry.builtin"


def _reraise_interrupt(err: BaseException) -> None:
    """Let a user's Ctrl-C through; every other exception of a plugin (``SystemExit``,
    ``GeneratorExit``, ...) is the plugin's problem, reported and skipped."""
    if isinstance(err, KeyboardInterrupt):
        raise err


def _source_of(ep: md.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    name = version = "<unknown>"
    if dist is not None:
        name = dist.metadata["Name"] or name
        version = dist.version or ""
    return PluginSource(ep.name, ep.value, name, version)


def _order(eps: Iterable[md.EntryPoint]) -> list[md.EntryPoint]:
    """The package's own plugin first, then by distribution and entry-point name; exact
    duplicates (one distribution seen twice on ``sys.path``) are dropped."""
    seen, out = set(), []
    for ep in eps:
        src = _source_of(ep)
        key = (src.plugin, src.value, src.distribution)
        if key not in seen:
            seen.add(key)
            out.append(ep)
    return sorted(out, key=lambda ep: (ep.value.split(":")[0] != _BUILTIN_MODULE,
                                       _source_of(ep).distribution.lower(), ep.name))


def discover(
    group: str = ENTRY_POINT_GROUP,
    *,
    strict: bool = False,
    entry_points: Sequence[md.EntryPoint] | None = None,
    extra_plugins: Sequence[tuple[str, Any]] = (),
) -> Registry:
    """Load every plugin of entry-point ``group`` and return a filled :class:`Registry`.

    Args:
        group: the entry-point group (default ``"gnrev.plugins"``).
        strict: raise :class:`PluginError` on the first problem instead of skipping the plugin.
        entry_points: use these instead of ``importlib.metadata.entry_points(group=group)``.
        extra_plugins: ``(name, module_or_object)`` pairs registered after the entry points
            (hosts that embed a plugin without installing it).

    Each plugin is registered with a :class:`pluggy.PluginManager` for project ``"gnrev"``
    (:attr:`Registry.plugin_manager`) and its hooks are called one plugin at a time
    (:meth:`pluggy.PluginManager.subset_hook_caller`), so a failure is attributed to, and
    rolls back, only that plugin.

    Returns:
        The filled :class:`~gnrev_plugin.registry.Registry`, with :attr:`~Registry.problems`
        listing every plugin that was reported and skipped.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(GnrevHookSpecs)
    reg = Registry(plugin_manager=pm)
    eps = list(md.entry_points(group=group)) if entry_points is None else list(entry_points)

    def report(source: PluginSource, stage: str, err: BaseException) -> None:
        problem = PluginProblem(source, stage, f"{type(err).__name__}: {err}")
        if strict:
            cls = DuplicateNameError if isinstance(err, DuplicateNameError) else PluginError
            raise cls(str(problem)) from err
        reg.problems.append(problem)
        warnings.warn(f"gnrev plugin skipped: {problem}", PluginWarning, stacklevel=3)

    candidates: list[tuple[PluginSource, Callable[[], Any]]] = [
        (_source_of(ep), ep.load) for ep in _order(eps)]
    for name, obj in extra_plugins:
        src = PluginSource(name, getattr(obj, "__name__", repr(obj)), "<not installed>", "")
        candidates.append((src, lambda obj=obj: obj))

    for source, load in candidates:
        try:
            plugin = load()
        except BaseException as err:
            _reraise_interrupt(err)
            report(source, "import", err)
            continue
        try:
            hash(plugin)  # pluggy keeps plugins in sets: a module, class or hashable object
            pm.register(plugin, name=source.plugin)
            pm.check_pending()  # unknown hook names (typos) of the plugin just registered
        except BaseException as err:
            _reraise_interrupt(err)
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            report(source, "validate", err)
            continue
        others = [p for p in pm.get_plugins() if p is not plugin]
        reg._current = source
        try:
            for hook in KINDS.values():
                pm.subset_hook_caller(hook, remove_plugins=others)(registry=reg)
        except BaseException as err:
            _reraise_interrupt(err)
            reg._remove_from(source)
            pm.unregister(plugin)
            report(source, "conflict" if isinstance(err, DuplicateNameError) else "register", err)
            continue
        finally:
            reg._current = _MANUAL
        reg.sources.append(source)
    return reg


_DEFAULT: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry of installed plugins (discovered on first use).

    Args:
        refresh: discover again (after installing a plugin in the running process).

    Returns:
        The shared :class:`~gnrev_plugin.registry.Registry`.
    """
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = discover()
    return _DEFAULT
