"""One spec, one build path: every runner builds what it runs through the registry, here.

A run is described by a small JSON-serialisable :class:`RunSpec`::

    RunSpec(model="gnrev.revmlp", model_kwargs={"hidden": 1024},
            optimizer="gnrev.exact_gn", optimizer_kwargs={"lr": 0.2},
            loss="cross_entropy", dataset="gnrev.mnist", dataset_kwargs={"train_size": 2048},
            metrics=["gnrev.ntk_similarity_to_init"], seed=42, device="cpu",
            epochs=3, batch_size=256, probe_size=128)

and :func:`build` turns it into a model, an optimizer, a loss and run metrics by resolving the
names in the plugin registry (:func:`gnrev_plugin.registry.get_registry`): built-ins live under
``gnrev.*`` and may be named without the prefix. Unset options come from the entry's registered
``defaults`` (the built-ins' are in :mod:`gnrev_plugin.defaults`); :meth:`RunSpec.resolve`
returns the spec with every name and default filled in, which is what runs record in their
``config.json``. ``gnrev train``, ``gnrev reproduce``, the benchopt benchmark and solvers, the
DeepOBS runner and the AlgoPerf submission all call these functions and nothing else.

Contracts (:mod:`gnrev_plugin.registry.hookspecs`): a model factory is called as
``factory(in_features=d, num_classes=C, **model_kwargs)`` with torch's RNG seeded by ``seed``
(in a forked RNG state); an optimizer factory as ``factory(params, **optimizer_kwargs)`` plus
``model=`` and ``loss=`` when its entry declares ``needs``; a run metric as
``fn(model, inputs=X_p, targets=Y_p, loss_fn=loss, initial_model=model₀)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .defaults import RUN_DEFAULTS
from .optim.targets import LOSSES
from .registry import PluginError, Registry, get_registry
from .registry.contracts import check_model_output, check_optimizer_object

__all__ = ["RunSpec", "Built", "LOSSES", "build", "build_model", "build_optimizer", "build_loss",
           "loss_targets", "build_run_metrics", "evaluate_run_metrics", "load_data",
           "parse_options", "short_name", "resolve_device"]

def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else get_registry()


def short_name(name: str) -> str:
    """``gnrev.exact_gn`` → ``exact_gn``; third-party names are kept whole."""
    return name.removeprefix("gnrev.")


@dataclass
class RunSpec:
    """A run: what to build (registry names and options), on what data, for how long.

    Every field is JSON (``to_dict``/``from_dict`` round-trip); the defaults are
    :data:`gnrev_plugin.defaults.RUN_DEFAULTS`.
    """

    model: str = RUN_DEFAULTS["model"]
    model_kwargs: dict = field(default_factory=dict)
    optimizer: str = RUN_DEFAULTS["optimizer"]
    optimizer_kwargs: dict = field(default_factory=dict)
    loss: str = RUN_DEFAULTS["loss"]
    dataset: str = RUN_DEFAULTS["dataset"]
    dataset_kwargs: dict = field(default_factory=dict)
    metrics: list = field(default_factory=lambda: list(RUN_DEFAULTS["metrics"]))
    seed: int = RUN_DEFAULTS["seed"]
    device: str = RUN_DEFAULTS["device"]
    epochs: int = RUN_DEFAULTS["epochs"]
    batch_size: int = RUN_DEFAULTS["batch_size"]
    probe_size: int = RUN_DEFAULTS["probe_size"]

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("epochs", "batch_size", "probe_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.probe_size < 1:
            raise ValueError(f"need epochs ≥ 0, batch_size ≥ 1 and probe_size ≥ 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.probe_size}")
        for name in ("model_kwargs", "optimizer_kwargs", "dataset_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
            setattr(self, name, dict(value))
        for name in ("model", "optimizer", "dataset", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.metrics, (str, bytes)) or not isinstance(self.metrics, (list, tuple)) \
                or not all(isinstance(m, str) and m for m in self.metrics):
            raise ValueError(f"metrics must be a list of metric names, got {self.metrics!r}")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device {self.device!r} is not a torch device: {err}") from None
        self.metrics = list(self.metrics)
        try:
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"a run spec must be JSON-serialisable: {err}") from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping) -> RunSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"a run spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown run spec keys {unknown}; known: {sorted(known)}")
        return cls(**copy.deepcopy(dict(d)))

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **copy.deepcopy(changes))

    # ------------------------------------------------------------------ resolution
    def resolve(self, registry: Registry | None = None) -> RunSpec:
        """The spec with registered names (``exact_gn`` → ``gnrev.exact_gn``) and every model
        and optimizer option filled from the entries' defaults. Raises
        :class:`~gnrev_plugin.registry.UnknownNameError` (listing the known names) or
        ``ValueError`` (a metric that is not a run metric)."""
        reg = _registry(registry)
        model = reg.resolve_name("model", self.model)
        optimizer = reg.resolve_name("optimizer", self.optimizer)
        metrics = [reg.resolve_name("metric", m) for m in self.metrics]
        for m in metrics:
            if reg.entry("metric", m).protocol != "run":
                runs = [e.name for e in reg.list("metric") if e.protocol == "run"]
                raise ValueError(f"metric {m!r} is a library function, not a run metric; run "
                                 f"metrics: {', '.join(runs)}")
        return self.replace(
            model=model, model_kwargs={**reg.entry("model", model).defaults, **self.model_kwargs},
            optimizer=optimizer,
            optimizer_kwargs={**reg.entry("optimizer", optimizer).defaults,
                              **self.optimizer_kwargs},
            dataset=reg.resolve_name("dataset", self.dataset), metrics=metrics)


@dataclass
class Built:
    """What :func:`build` returns: the resolved spec and the built objects."""

    spec: RunSpec
    model: nn.Module
    optimizer: Any
    loss_fn: nn.Module
    metrics: dict
    initial_model: nn.Module | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing a CUDA device on a machine without one (``ValueError``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but torch.cuda.is_available() is "
                         "False on this machine")
    return dev


def build_model(name: str, kwargs: Mapping | None = None, *, in_features: int, num_classes: int,
                seed: int = 0, device: str | torch.device = "cpu",
                registry: Registry | None = None) -> nn.Module:
    """``factory(in_features=d, num_classes=C, **(defaults | kwargs))`` of model ``name``, with
    torch's RNG seeded by ``seed`` in a forked state (the caller's RNG is untouched)."""
    reg = _registry(registry)
    name = reg.resolve_name("model", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = reg.get_model(name, in_features=int(in_features),
                                  num_classes=int(num_classes), **dict(kwargs or {}))
        except TypeError as err:
            raise ValueError(f"model {name!r} rejected its options {dict(kwargs or {})}: "
                             f"{err}{_valid_keys(reg, 'model', name, dict(kwargs or {}))}"
                             ) from err
        except (ValueError, PluginError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:
            raise PluginError(f"model {name!r} failed to build with options "
                              f"{dict(kwargs or {})}: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise PluginError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    model = model.to(resolve_device(device))
    _dry_forward(name, model, int(in_features), int(num_classes))
    return model


def _dry_forward(name: str, model: nn.Module, in_features: int, num_classes: int) -> None:
    """Forward one zero sample (eval mode, no grad, RNG untouched) and check the output width,
    so that a model of the wrong width fails before the run, naming the entry."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_features, dtype=param.dtype if param is not None and
                    param.is_floating_point() else torch.get_default_dtype(),
                    device=param.device if param is not None else "cpu")
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            out = model(x)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        raise PluginError(f"model {name!r} failed a dry forward of one sample of {in_features} "
                          f"features: {type(err).__name__}: {err}") from err
    finally:
        for m, training in modes:       # each module's own mode (a mixed model stays mixed)
            m.training = training
    if problem := check_model_output(out, num_classes):
        raise PluginError(f"model {name!r}: {problem}")


def build_optimizer(name: str, model: nn.Module, kwargs: Mapping | None = None, *,
                    loss: str = "cross_entropy", registry: Registry | None = None) -> Any:
    """``factory(trainable params, **(defaults | kwargs))`` of optimizer ``name``, plus
    ``model=model`` and ``loss=loss`` when the entry declares it needs them."""
    reg = _registry(registry)
    name = reg.resolve_name("optimizer", name)
    entry = reg.entry("optimizer", name)
    extra = {}
    if "model" in entry.needs:
        extra["model"] = model
    if "loss" in entry.needs:
        extra["loss"] = loss
    kwargs = dict(kwargs or {})
    if clash := sorted(set(kwargs) & set(extra)):
        raise ValueError(f"optimizer {name!r}: {clash} are set by the runner, not by options")
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = reg.get_optimizer(name, params, **kwargs, **extra)
    except TypeError as err:
        raise ValueError(f"optimizer {name!r} rejected its options {kwargs}: {err}"
                         f"{_valid_keys(reg, 'optimizer', name, kwargs)}") from err
    except (ValueError, PluginError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        raise PluginError(f"optimizer {name!r} (registered by "
                          f"{reg.entry('optimizer', name).source.describe()}) failed to build: "
                          f"{type(err).__name__}: {err}") from err
    if problem := check_optimizer_object(opt):
        raise PluginError(f"optimizer {name!r}: {problem}")
    return opt


def _valid_keys(reg: Registry, kind: str, name: str, kwargs: Mapping) -> str:
    """``"; valid options: a, b, c"`` from the factory's signature when ``kwargs`` holds a key it
    does not accept (empty when the signature takes ``**kwargs`` or cannot be read)."""
    import inspect

    try:
        factory = reg.entry(kind, name).resolve()
        sig = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
    except (TypeError, ValueError, PluginError):
        return ""
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ""
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in ("self", "params", "model", "loss", "in_features", "num_classes")]
    unknown = sorted(set(kwargs) - set(valid))
    return f"; unknown {unknown}; valid options: {', '.join(valid)}" if unknown else ""


def build_loss(kind: str) -> nn.Module:
    """``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` (mean reduction) for a :data:`LOSSES` name."""
    if kind == "cross_entropy":
        return nn.CrossEntropyLoss()
    if kind == "mse":
        return nn.MSELoss()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def loss_targets(kind: str, y: torch.Tensor, num_classes: int, dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """The targets the loss takes for class labels ``y``: ``y`` itself (cross-entropy) or the
    one-hot matrix ``Y`` (MSE, in ``dtype``)."""
    if kind == "cross_entropy":
        return y
    if kind == "mse":
        return nn.functional.one_hot(y.long(), num_classes).to(dtype or torch.get_default_dtype())
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def build_run_metrics(names: Iterable[str], registry: Registry | None = None) -> dict:
    """``{registered name: fn}`` for run metrics (``ValueError`` for a non-run metric)."""
    reg = _registry(registry)
    out = {}
    for n in names:
        n = reg.resolve_name("metric", n)
        entry = reg.entry("metric", n)
        if entry.protocol != "run":
            raise ValueError(f"metric {n!r} is not a run metric (protocol {entry.protocol!r})")
        out[n] = reg.get_metric(n)
    return out


def evaluate_run_metrics(metrics: Mapping, model: nn.Module, *, inputs: torch.Tensor,
                         targets: torch.Tensor, loss_fn: nn.Module,
                         initial_model: nn.Module) -> dict[str, float | None]:
    """Call every run metric and flatten: ``{name: v}`` or ``{name.key: v}`` for dict values;
    non-finite values become ``None`` (JSON null)."""
    row: dict[str, float | None] = {}
    was_training = model.training
    model.eval()
    try:
        for name, fn in metrics.items():
            value = fn(model, inputs=inputs, targets=targets, loss_fn=loss_fn,
                       initial_model=initial_model)
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            for key, v in items:
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    raise PluginError(f"run metric {name!r} returned {type(v).__name__}, "
                                      "not a float or a dict of floats") from None
                row[name if key is None else f"{name}.{key}"] = v if math.isfinite(v) else None
    finally:
        model.train(was_training)
    return row


def load_data(name: str, kwargs: Mapping | None = None, *, input_multiple: int = 1,
              registry: Registry | None = None):
    """Load dataset ``name`` (a :class:`gnrev_plugin.data.Dataset`) and pad its inputs with zero
    features to a multiple of ``input_multiple`` (what the model's entry declares)."""
    from .data import Dataset, pad_to_multiple

    reg = _registry(registry)
    name = reg.resolve_name("dataset", name)
    try:
        ds = reg.get_dataset(name, **dict(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"dataset {name!r} rejected its options {dict(kwargs or {})}: "
                         f"{err}{_valid_keys(reg, 'dataset', name, dict(kwargs or {}))}") from err
    except (ValueError, PluginError, FileNotFoundError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        raise PluginError(f"dataset {name!r} failed to load with options {dict(kwargs or {})}: "
                          f"{type(err).__name__}: {err}") from err
    if not isinstance(ds, Dataset):
        raise PluginError(f"dataset {name!r} returned {type(ds).__name__}, not a "
                          "gnrev_plugin.data.Dataset")
    return pad_to_multiple(ds, input_multiple)


def build(spec: RunSpec, *, in_features: int, num_classes: int,
          registry: Registry | None = None, initial_model: bool = True) -> Built:
    """Build the model, optimizer, loss and run metrics of ``spec`` (resolved first).

    ``initial_model``: also keep a copy of the model at init, never stepped (the run metrics'
    reference; its parameters keep ``requires_grad`` so Jacobian-based metrics work on it).
    """
    reg = _registry(registry)
    spec = spec.resolve(reg)
    model = build_model(spec.model, spec.model_kwargs, in_features=in_features,
                        num_classes=num_classes, seed=spec.seed, device=spec.device, registry=reg)
    model0 = copy.deepcopy(model).eval() if initial_model else None  # never stepped
    optimizer = build_optimizer(spec.optimizer, model, spec.optimizer_kwargs, loss=spec.loss,
                                registry=reg)
    return Built(spec, model, optimizer, build_loss(spec.loss),
                 build_run_metrics(spec.metrics, reg), model0)


def parse_options(pairs: Sequence[str] | None) -> dict:
    """``["lr=0.1", "hidden=[64, 64]", "rank_policy=warn"]`` → ``{"lr": 0.1, ...}``: each value is
    read as JSON (numbers, booleans, lists, null), else kept as a string."""
    out: dict = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"options are KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
