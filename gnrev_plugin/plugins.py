"""Plugin discovery: pluggy hooks behind the ``gnrev.plugins`` entry-point group, and a registry.

Hosts (training loops, benchmark runners, test suites) call::

    from gnrev_plugin.plugins import get_registry
    reg = get_registry()                                   # discovers every installed plugin once
    model = reg.get_model("gnrev.revmlp", in_features=784, hidden=2000, num_blocks=2,
                          num_classes=10)
    opt = reg.get_optimizer("gnrev.exact_gn", model.parameters(), lr=1.0, loss="cross_entropy")
    for entry in reg.list():                               # every name with the distribution behind it
        print(entry.kind, entry.name, entry.distribution)

Discovery goes through :func:`importlib.metadata.entry_points` (group :data:`ENTRY_POINT_GROUP`);
gnrev-plugin itself registers its built-ins through that same group
(``gnrev = "gnrev_plugin.builtin_plugin"``), so first- and third-party plugins are treated alike,
except that the package's own plugin is processed first and therefore owns the ``gnrev.*`` names.

Robustness contract: a plugin that fails to import, implements an unknown hook, raises inside a
hook, or registers a name that another distribution already registered is **reported and
skipped** (all of its entries are rolled back); the host keeps working. The report is
:attr:`Registry.problems` (``gnrev list`` prints it) and a :class:`PluginWarning` per problem;
``discover(strict=True)`` raises instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from .hookspecs import ENTRY_POINT_GROUP, PROJECT, GnrevHookSpecs, hookimpl, hookspec

__all__ = [
    "PROJECT", "ENTRY_POINT_GROUP", "KINDS", "hookimpl", "hookspec", "Entry", "PluginSource",
    "PluginProblem", "PluginError", "PluginWarning", "DuplicateNameError", "UnknownNameError", "Registry",
    "LazyFactory", "discover", "get_registry", "OPTIMIZER_NEEDS", "METRIC_PROTOCOLS",
    "check_factory_contract",
]

#: Entry kinds, in the order ``gnrev list`` shows them, with their registration hook.
KINDS: dict[str, str] = {
    "model": "gnrev_register_models",
    "optimizer": "gnrev_register_optimizers",
    "metric": "gnrev_register_metrics",
    "dataset": "gnrev_register_datasets",
}
_BUILTIN_MODULE = "gnrev_plugin.builtin_plugin"
#: What an optimizer factory may declare it needs besides ``params``: ``"model"`` (the
#: ``nn.Module`` being trained, passed as ``model=``) and ``"loss"`` (the loss name,
#: ``"cross_entropy"`` or ``"mse"``, passed as ``loss=``).
OPTIMIZER_NEEDS = ("model", "loss")
#: Metric protocols: ``"run"`` metrics are called by runners at every logged epoch as
#: ``fn(model, *, inputs, targets, loss_fn, initial_model, **_)``; ``"function"`` metrics are
#: library functions with their own signature (``gnrev.linear_cka(X, Y)``, ...).
METRIC_PROTOCOLS = ("run", "function")
_RUN_METRIC_KEYWORDS = ("inputs", "targets", "loss_fn", "initial_model")


class PluginError(RuntimeError):
    """A plugin could not be loaded or an entry could not be built."""


class PluginWarning(UserWarning):
    """A plugin was reported and skipped (see :attr:`Registry.problems`)."""


class DuplicateNameError(PluginError):
    """Two distributions register the same name; the message names both."""


class UnknownNameError(PluginError, KeyError):
    """No plugin registered the requested name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


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
        except Exception as err:
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
            input_multiple: int = 1) -> Entry:
        """Register ``name`` under ``kind``; ``factory`` is a callable or ``"module:attr"``.

        The factory contracts are those of :mod:`gnrev_plugin.hookspecs`. They are checked here
        for a callable factory and on first use for a lazy ``"module:attr"`` one; a breach is a
        :class:`PluginError` that names the entry, so the plugin is reported and skipped.

        Raises:
            DuplicateNameError: if ``name`` is already registered for ``kind`` (both
                distributions are named).
            PluginError: the factory breaks its contract, or ``defaults`` / ``needs`` /
                ``protocol`` / ``input_multiple`` are malformed.
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
        defaults, needs = dict(defaults or {}), tuple(needs)
        where = f"{kind} {name!r}"
        try:
            json.dumps(defaults, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise PluginError(f"{where}: defaults must be JSON values ({err})") from None
        if needs and kind != "optimizer":
            raise PluginError(f"{where}: only optimizers declare needs")
        if bad := [n for n in needs if n not in OPTIMIZER_NEEDS]:
            raise PluginError(f"{where}: unknown needs {bad}; known: {list(OPTIMIZER_NEEDS)}")
        if kind == "metric":
            protocol = protocol or "function"
            if protocol not in METRIC_PROTOCOLS:
                raise PluginError(f"{where}: protocol must be one of {list(METRIC_PROTOCOLS)}, "
                                  f"got {protocol!r}")
        elif protocol:
            raise PluginError(f"{where}: only metrics declare a protocol")
        if not isinstance(input_multiple, int) or input_multiple < 1 or (
                input_multiple != 1 and kind != "model"):
            raise PluginError(f"{where}: input_multiple must be a positive int (models only)")
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
                      protocol, input_multiple)
        table[name] = entry
        return entry

    def add_model(self, name: str, factory: Callable | str, description: str = "", *,
                  defaults: dict | None = None, input_multiple: int = 1) -> Entry:
        """Register a model factory ``factory(*, in_features, num_classes, **kwargs) ->
        nn.Module`` (the runner passes the dataset's shape; ``defaults`` fill ``kwargs``)."""
        return self.add("model", name, factory, description, defaults=defaults,
                        input_multiple=input_multiple)

    def add_optimizer(self, name: str, factory: Callable | str, description: str = "", *,
                      defaults: dict | None = None, needs: Sequence[str] = ()) -> Entry:
        """Register a torch.optim-style factory ``factory(params, **kwargs)``; an optimizer that
        also needs the model and the loss declares ``needs=("model", "loss")``."""
        return self.add("optimizer", name, factory, description, defaults=defaults, needs=needs)

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


def _accepts(sig: inspect.Signature, keyword: str) -> bool:
    p = sig.parameters.get(keyword)
    return (p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or any(
        q.kind is q.VAR_KEYWORD for q in sig.parameters.values())


def check_factory_contract(kind: str, factory: Any, protocol: str = "", bound: tuple = ()
                           ) -> str | None:
    """Why ``factory`` cannot serve as a ``kind`` factory (``None`` if it can).

    The contracts (:mod:`gnrev_plugin.hookspecs`): a model factory accepts the keywords
    ``in_features`` and ``num_classes``; an optimizer factory accepts ``params`` positionally;
    a run metric accepts the model positionally and the keywords ``inputs``, ``targets``,
    ``loss_fn``, ``initial_model``. ``bound`` are positional arguments a :class:`LazyFactory`
    binds in front. Objects without an inspectable signature are accepted.
    """
    if not callable(factory):
        return f"the factory is not callable ({type(factory).__name__})"
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    if bound:
        try:
            sig = sig.replace(parameters=list(sig.parameters.values())[len(bound):])
        except ValueError:
            return None
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    if kind == "model":
        missing = [k for k in ("in_features", "num_classes") if not _accepts(sig, k)]
        if missing:
            return (f"a model factory must accept the keywords in_features= and num_classes= "
                    f"(the runner passes the dataset's shape); {factory!r} does not accept "
                    f"{missing}")
    elif kind == "optimizer" or (kind == "metric" and protocol == "run"):
        if not positional and not var_positional:
            what = "params" if kind == "optimizer" else "the model"
            return f"the factory must take {what} as its first positional argument"
        if kind == "metric":
            missing = [k for k in _RUN_METRIC_KEYWORDS if not _accepts(sig, k)]
            if missing:
                return (f"a run metric must accept the keywords {list(_RUN_METRIC_KEYWORDS)} "
                        f"(or **kwargs); it does not accept {missing}")
    return None


def _bound(entry: Entry, cfg: dict) -> dict:
    return {**entry.factory.kwargs, **cfg} if isinstance(entry.factory, LazyFactory) else cfg


def _bound_args(entry: Entry) -> tuple:
    return entry.factory.args if isinstance(entry.factory, LazyFactory) else ()


def _first_doc_line(factory: Any) -> str:
    if isinstance(factory, LazyFactory):
        return ""
    doc = getattr(factory, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


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
        except Exception as err:
            report(source, "import", err)
            continue
        try:
            hash(plugin)  # pluggy keeps plugins in sets: a module, class or hashable object
            pm.register(plugin, name=source.plugin)
            pm.check_pending()  # unknown hook names (typos) of the plugin just registered
        except Exception as err:
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            report(source, "validate", err)
            continue
        others = [p for p in pm.get_plugins() if p is not plugin]
        reg._current = source
        try:
            for hook in KINDS.values():
                pm.subset_hook_caller(hook, remove_plugins=others)(registry=reg)
        except Exception as err:
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
    """The process-wide registry of installed plugins (discovered on first use)."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = discover()
    return _DEFAULT
