"""The registry: name → factory tables for models, optimizers, metrics and datasets.

Plugins fill it in their hooks (:mod:`gnrev_plugin.registry.hookspecs`); hosts read it. Each
:class:`Entry` carries, as data, what runners need to know about it: its defaults, what an
optimizer needs besides ``params``, a metric's protocol, a model's input multiple, and its
capability ``tags`` (:data:`~gnrev_plugin.registry.contracts.TAGS`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from .contracts import KINDS, check_entry_fields, check_factory_contract
from .errors import DuplicateNameError, PluginError, UnknownNameError

__all__ = ["Entry", "PluginSource", "PluginProblem", "LazyFactory", "Registry"]


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from: its entry-point name and value, distribution and version."""

    plugin: str
    value: str
    distribution: str
    version: str

    def describe(self) -> str:
        return f"{self.distribution} {self.version} (plugin {self.plugin!r} = {self.value})"


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that was reported and skipped.

    ``stage`` is one of ``"import"``, ``"validate"``, ``"register"`` (a hook raised) and
    ``"conflict"`` (a duplicate name).
    """

    source: PluginSource
    stage: str
    message: str

    def __str__(self) -> str:
        return f"[{self.stage}] {self.source.describe()}: {self.message}"


class LazyFactory:
    """A factory named by ``"package.module:attribute"``, imported only when first called.

    Extra ``args``/``kwargs`` are bound in front of the caller's, like :func:`functools.partial`.
    A missing optional module therefore never breaks discovery, only the use of that one entry.
    """

    def __init__(self, target: str, *args: Any, **kwargs: Any) -> None:
        if not isinstance(target, str) or target.count(":") != 1:
            raise ValueError(f"a lazy target must look like 'package.module:attribute', "
                             f"got {target!r}")
        self.target, self.args, self.kwargs = target, args, kwargs
        self._obj: Any = None

    def resolve(self) -> Any:
        """Import and return the target object (cached)."""
        if self._obj is None:
            module, attr = self.target.split(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._obj = obj
        return self._obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*self.args, *args, **{**self.kwargs, **kwargs})

    def __repr__(self) -> str:
        bound = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return self.target + (f"({', '.join(bound)})" if bound else "")


@dataclass(frozen=True)
class Entry:
    """One registered name.

    Attributes:
        kind: ``"model"``, ``"optimizer"``, ``"metric"`` or ``"dataset"``.
        name: the registered name (namespaced by convention, e.g. ``"gnrev.exact_gn"``).
        factory: a callable or a :class:`LazyFactory`.
        source: the plugin and distribution that registered it.
        description: one line for listings.
        defaults: keyword arguments a runner passes unless the user overrides them (JSON
            values; models and optimizers).
        needs: optimizers only: what the factory needs besides ``params``
            (:data:`OPTIMIZER_NEEDS`), declared as data so runners never inspect types.
        protocol: metrics only: ``"run"`` or ``"function"`` (:data:`METRIC_PROTOCOLS`).
        input_multiple: models only: the input width must be a multiple of this (a RevMLP
            splits its input in halves: 2); runners pad the data with zero features.
        tags: capabilities as data (:data:`~gnrev_plugin.registry.contracts.TAGS`), e.g.
            ``("gauss_newton", "batch_step", "distributed")``; empty unless declared.
    """

    kind: str
    name: str
    factory: Any
    source: PluginSource
    description: str = ""
    defaults: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    protocol: str = ""
    input_multiple: int = 1
    tags: tuple[str, ...] = ()

    @property
    def distribution(self) -> str:
        return self.source.distribution

    @property
    def version(self) -> str:
        return self.source.version

    @property
    def plugin(self) -> str:
        return self.source.plugin

    @property
    def target(self) -> str:
        """Where the factory lives (``module:attribute``), for listings."""
        if isinstance(self.factory, LazyFactory):
            return repr(self.factory)
        mod = getattr(self.factory, "__module__", None) or type(self.factory).__module__
        qual = getattr(self.factory, "__qualname__", None) or type(self.factory).__qualname__
        return f"{mod}:{qual}"

    def resolve(self) -> Any:
        """The factory's object (imports a lazy target and checks its contract, see
        :func:`check_factory_contract`); raises :class:`PluginError` on failure."""
        if not isinstance(self.factory, LazyFactory):
            return self.factory
        try:
            obj = self.factory.resolve()
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit at a plugin's import included
            raise PluginError(
                f"{self.kind} {self.name!r} registered by {self.source.describe()} could not be "
                f"loaded from {self.factory.target}: {type(err).__name__}: {err}") from err
        problem = check_factory_contract(self.kind, obj, self.protocol, bound=self.factory.args)
        if problem:
            raise PluginError(f"{self.kind} {self.name!r} registered by "
                              f"{self.source.describe()} breaks the factory contract: {problem}")
        return obj


_MANUAL = PluginSource("<manual>", "<registered in code>", "<unknown>", "")


@dataclass
class Registry:
    """Name → factory tables for models, optimizers, metrics and datasets.

    Plugins fill it in their hooks with :meth:`add_model`, :meth:`add_optimizer`,
    :meth:`add_metric`, :meth:`add_dataset`; hosts read it with :meth:`get_model`,
    :meth:`get_optimizer`, :meth:`get_metric`, :meth:`get_dataset` and :meth:`list`.
    """

    problems: list[PluginProblem] = field(default_factory=list)
    sources: list[PluginSource] = field(default_factory=list)
    plugin_manager: pluggy.PluginManager | None = None
    _tables: dict[str, dict[str, Entry]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS})
    _current: PluginSource = _MANUAL

    # ----------------------------------------------------------------- registration (plugins)
    def add(self, kind: str, name: str, factory: Callable | str, description: str = "", *,
            defaults: dict | None = None, needs: Sequence[str] = (), protocol: str = "",
            input_multiple: int = 1, tags: Sequence[str] = ()) -> Entry:
        """Register ``name`` under ``kind``; ``factory`` is a callable or ``"module:attr"``.

        ``tags`` are the entry's capabilities as data (``"gauss_newton"``, ``"batch_step"``,
        ``"distributed"``, ...: :data:`~gnrev_plugin.registry.contracts.TAGS`); runners read
        them with :meth:`tags`, never from the name or the type.

        The factory contracts are those of :mod:`gnrev_plugin.registry.hookspecs`. They are
        checked here for a callable factory and on first use for a lazy ``"module:attr"`` one; a
        breach is a :class:`PluginError` that names the entry, so the plugin is reported and
        skipped.

        Raises:
            DuplicateNameError: if ``name`` is already registered for ``kind`` (both
                distributions are named).
            PluginError: the factory breaks its contract, or ``defaults`` / ``needs`` /
                ``protocol`` / ``input_multiple`` / ``tags`` are malformed.

        Returns:
            The new :class:`Entry`.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: {list(KINDS)}")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise PluginError(f"a {kind} name must be a non-empty string without spaces, "
                              f"got {name!r}")
        if isinstance(factory, str):
            factory = LazyFactory(factory)
        elif not callable(factory):
            raise TypeError(f"the factory of {kind} {name!r} must be callable or a "
                            f"'module:attr' string, got {type(factory).__name__}")
        defaults, needs, protocol, tags = check_entry_fields(
            kind, name, defaults=defaults, needs=needs, protocol=protocol,
            input_multiple=input_multiple, tags=tags)
        where = f"{kind} {name!r}"
        if not isinstance(factory, LazyFactory):
            problem = check_factory_contract(kind, factory, protocol)
            if problem:
                raise PluginError(f"{where} breaks the factory contract: {problem}")
        table = self._tables[kind]
        if name in table:
            old = table[name]
            raise DuplicateNameError(
                f"{kind} name {name!r} is registered twice: first by "
                f"{old.source.describe()}, again by {self._current.describe()}")
        if not description:
            description = _first_doc_line(factory)
        entry = Entry(kind, name, factory, self._current, description, defaults, needs,
                      protocol, input_multiple, tags)
        table[name] = entry
        return entry

    def add_model(self, name: str, factory: Callable | str, description: str = "", *,
                  defaults: dict | None = None, input_multiple: int = 1,
                  tags: Sequence[str] = ()) -> Entry:
        """Register a model factory ``factory(*, in_features, num_classes, **kwargs) ->
        nn.Module`` (the runner passes the dataset's shape; ``defaults`` fill ``kwargs``)."""
        return self.add("model", name, factory, description, defaults=defaults,
                        input_multiple=input_multiple, tags=tags)

    def add_optimizer(self, name: str, factory: Callable | str, description: str = "", *,
                      defaults: dict | None = None, needs: Sequence[str] = (),
                      tags: Sequence[str] = ()) -> Entry:
        """Register a torch.optim-style factory ``factory(params, **kwargs)``; an optimizer that
        also needs the model and the loss declares ``needs=("model", "loss")``, and its
        capabilities as ``tags`` (``("gauss_newton", "batch_step", "distributed")``)."""
        return self.add("optimizer", name, factory, description, defaults=defaults, needs=needs,
                        tags=tags)

    def add_metric(self, name: str, factory: Callable | str, description: str = "", *,
                   protocol: str = "function") -> Entry:
        """Register a metric; ``protocol="run"`` for a run metric
        ``fn(model, *, inputs, targets, loss_fn, initial_model, **_) -> float | dict``."""
        return self.add("metric", name, factory, description, protocol=protocol)

    def add_dataset(self, name: str, factory: Callable | str, description: str = "") -> Entry:
        """Register a dataset loader ``factory(**kwargs) ->`` :class:`gnrev_plugin.data.Dataset`."""
        return self.add("dataset", name, factory, description)

    # ----------------------------------------------------------------- lookup (hosts)
    def entry(self, kind: str, name: str) -> Entry:
        """The :class:`Entry` for ``name``; :class:`UnknownNameError` lists the known names."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: {list(KINDS)}")
        try:
            return self._tables[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._tables[kind])) or "none"
            raise UnknownNameError(f"no {kind} named {name!r}; known {kind}s: {known}") from None

    def tags(self, kind: str, name: str) -> tuple[str, ...]:
        """The capability tags of registered ``name`` (resolved as :meth:`resolve_name` does).

        Args:
            kind: the entry kind.
            name: a registered name, or a built-in's without its ``gnrev.`` prefix.

        Returns:
            The entry's tags (empty when it declared none).
        """
        return self.entry(kind, self.resolve_name(kind, name)).tags

    def optimizer_tags(self, name: str) -> tuple[str, ...]:
        """The capability tags of optimizer ``name``: ``self.tags("optimizer", name)``."""
        return self.tags("optimizer", name)

    def names(self, kind: str) -> list[str]:
        """Sorted names of one kind."""
        return sorted(self._tables[kind])

    def resolve_name(self, kind: str, name: str) -> str:
        """The registered name for ``name``: itself, or ``"gnrev." + name`` for a built-in given
        without its prefix (``exact_gn`` → ``gnrev.exact_gn``). :class:`UnknownNameError` lists
        the registered names of that kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: {list(KINDS)}")
        table = self._tables[kind]
        if name in table:
            return name
        for candidate in (f"gnrev.{name}", f"gnrev.{name.replace('-', '_')}"):
            if candidate in table:
                return candidate
        return self.entry(kind, name).name  # raises with the list of known names

    def get_model(self, name: str, /, **cfg: Any) -> Any:
        """Build model ``name`` with ``factory(**(defaults | cfg))``."""
        e = self.entry("model", name)
        return e.resolve()(*_bound_args(e), **_bound(e, {**e.defaults, **cfg}))

    def get_optimizer(self, name: str, params: Iterable, /, **cfg: Any) -> Any:
        """Build optimizer ``name`` with ``factory(params, **(defaults | cfg))``; the caller
        passes what the entry :attr:`~Entry.needs` (``model=``, ``loss=``)."""
        e = self.entry("optimizer", name)
        return e.resolve()(*_bound_args(e), params, **_bound(e, {**e.defaults, **cfg}))

    def get_metric(self, name: str) -> Any:
        """The metric callable registered as ``name``."""
        e = self.entry("metric", name)
        fn = e.resolve()
        if isinstance(e.factory, LazyFactory) and (e.factory.args or e.factory.kwargs):
            return e.factory
        return fn

    def get_dataset(self, name: str, /, **cfg: Any) -> Any:
        """Load dataset ``name`` with ``loader(**cfg)``."""
        e = self.entry("dataset", name)
        return e.resolve()(*_bound_args(e), **_bound(e, cfg))

    def list(self, kind: str | None = None) -> list[Entry]:  # noqa: A003 - the documented API
        """Every entry (or those of one ``kind``), ordered by kind then name."""
        kinds = list(KINDS) if kind is None else [kind]
        return [self._tables[k][n] for k in kinds for n in sorted(self._tables[k])]

    def __contains__(self, name: str) -> bool:
        return any(name in t for t in self._tables.values())

    # ----------------------------------------------------------------- plugin bookkeeping
    def _remove_from(self, source: PluginSource) -> None:
        for table in self._tables.values():
            for name in [n for n, e in table.items() if e.source is source]:
                del table[name]


def _bound(entry: Entry, cfg: dict) -> dict:
    return {**entry.factory.kwargs, **cfg} if isinstance(entry.factory, LazyFactory) else cfg


def _bound_args(entry: Entry) -> tuple:
    return entry.factory.args if isinstance(entry.factory, LazyFactory) else ()


def _first_doc_line(factory: Any) -> str:
    if isinstance(factory, LazyFactory):
        return ""
    doc = getattr(factory, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
