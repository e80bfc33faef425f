"""The factory contracts and entry fields every registration is checked against.

The contracts are those stated on the hooks (:mod:`gnrev_plugin.registry.hookspecs`); this module
holds the checks, so that a plugin breaking them is reported and skipped by name rather than
failing inside a runner.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any

from .errors import PluginError

__all__ = ["KINDS", "OPTIMIZER_NEEDS", "METRIC_PROTOCOLS", "TAGS", "OPTIMIZER_ATTRIBUTES",
           "check_factory_contract", "check_entry_fields", "check_optimizer_object",
           "check_model_output"]

#: Entry kinds, in the order ``gnrev list`` shows them, with their registration hook.
KINDS: dict[str, str] = {
    "model": "gnrev_register_models",
    "optimizer": "gnrev_register_optimizers",
    "metric": "gnrev_register_metrics",
    "dataset": "gnrev_register_datasets",
}
#: What an optimizer factory may declare it needs besides ``params``: ``"model"`` (the
#: ``nn.Module`` being trained, passed as ``model=``) and ``"loss"`` (the loss name,
#: ``"cross_entropy"`` or ``"mse"``, passed as ``loss=``).
OPTIMIZER_NEEDS = ("model", "loss")
#: Metric protocols: ``"run"`` metrics are called by runners at every logged epoch as
#: ``fn(model, *, inputs, targets, loss_fn, initial_model, **_)``; ``"function"`` metrics are
#: library functions with their own signature (``gnrev.linear_cka(X, Y)``, ...).
METRIC_PROTOCOLS = ("run", "function")
#: Capability tags the runners read (an entry may declare others; they are listed, not used).
#: Capabilities are declared as data so that no runner infers them from a name or a type.
TAGS: dict[str, str] = {
    "gauss_newton": "solves the Gauss-Newton output-space system J Δθ = −α ε: its batch size is "
                    "bounded by that system",
    "batch_step": "steps on a whole batch, step_on_batch(x, y), applying the loss by name",
    "distributed": "steps on a batch shared by several processes (process_group=)",
    "sharpness": "a sharpness regulariser wrapping a base optimizer",
}
#: What a runner uses of the object an optimizer factory returns (``torch.optim.Optimizer``-like).
OPTIMIZER_ATTRIBUTES = ("step", "zero_grad", "param_groups", "state_dict")
_RUN_METRIC_KEYWORDS = ("inputs", "targets", "loss_fn", "initial_model")


def check_entry_fields(kind: str, name: str, *, defaults: dict, needs: Sequence[str],
                       protocol: str, input_multiple: int, tags: Sequence[str]
                       ) -> tuple[dict, tuple[str, ...], str, tuple[str, ...]]:
    """Validate the data fields of an entry (not its factory).

    Args:
        kind: ``"model"``, ``"optimizer"``, ``"metric"`` or ``"dataset"``.
        name: the name being registered (for the messages).
        defaults: JSON keyword defaults.
        needs: optimizers only, a subset of :data:`OPTIMIZER_NEEDS`.
        protocol: metrics only, one of :data:`METRIC_PROTOCOLS` (empty means ``"function"``).
        input_multiple: models only, a positive int.
        tags: capability tags, non-empty strings without spaces (:data:`TAGS` are those
            runners read).

    Returns:
        ``(defaults, needs, protocol, tags)`` normalised (copies, tuples, the metric's default
        protocol filled in).

    Raises:
        PluginError: a malformed field, naming the entry.
    """
    where = f"{kind} {name!r}"
    if defaults is not None and not isinstance(defaults, dict):
        raise PluginError(f"{where}: defaults must be a dict, got {type(defaults).__name__}")
    for field_name, value in (("needs", needs), ("tags", tags)):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise PluginError(f"{where}: {field_name} must be a list or tuple of strings, got "
                              f"{value!r}")
    defaults, needs, tags = dict(defaults or {}), tuple(needs), tuple(tags)
    if not isinstance(protocol, str):
        raise PluginError(f"{where}: protocol must be a string, got {protocol!r}")
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
    if isinstance(input_multiple, bool) or not isinstance(input_multiple, int) or input_multiple < 1 or (
            input_multiple != 1 and kind != "model"):
        raise PluginError(f"{where}: input_multiple must be a positive int (models only)")
    if bad := [t for t in tags if not isinstance(t, str) or not t or any(c.isspace() for c in t)]:
        raise PluginError(f"{where}: tags must be non-empty strings without spaces, got {bad}")
    return defaults, needs, protocol, tags


def _accepts(sig: inspect.Signature, keyword: str) -> bool:
    p = sig.parameters.get(keyword)
    return (p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or any(
        q.kind is q.VAR_KEYWORD for q in sig.parameters.values())


def check_factory_contract(kind: str, factory: Any, protocol: str = "", bound: tuple = ()
                           ) -> str | None:
    """Why ``factory`` cannot serve as a ``kind`` factory (``None`` if it can).

    The contracts (:mod:`gnrev_plugin.registry.hookspecs`): a model factory accepts the keywords
    ``in_features`` and ``num_classes``; an optimizer factory accepts ``params`` positionally;
    a run metric accepts the model positionally and the keywords ``inputs``, ``targets``,
    ``loss_fn``, ``initial_model``. Objects without an inspectable signature are accepted.

    Args:
        kind: ``"model"``, ``"optimizer"``, ``"metric"`` or ``"dataset"``.
        factory: the object registered for the entry.
        protocol: metrics only: ``"run"`` or ``"function"``.
        bound: positional arguments a :class:`~gnrev_plugin.registry.LazyFactory` binds in
            front (they are dropped from the signature first).

    Returns:
        A one-line reason naming what is missing, or ``None`` when the contract holds.
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


def check_optimizer_object(obj: Any) -> str | None:
    """Why ``obj`` (what an optimizer factory returned) cannot be stepped by a runner.

    Args:
        obj: the factory's result.

    Returns:
        A one-line reason (``None`` returned, or the :data:`OPTIMIZER_ATTRIBUTES` it lacks), or
        ``None`` when it is ``torch.optim.Optimizer``-like.
    """
    if obj is None:
        return "the factory returned None, not an optimizer"
    missing = [a for a in OPTIMIZER_ATTRIBUTES if not hasattr(obj, a)]
    if missing or not callable(obj.step) or not callable(obj.zero_grad):
        return (f"the factory returned {type(obj).__name__}, which is not torch.optim.Optimizer-"
                f"like: it lacks {missing or ['callable step/zero_grad']}")
    return None


def check_model_output(out: Any, num_classes: int) -> str | None:
    """Why ``out``, a model's output on one sample, does not fit ``num_classes`` classes.

    Args:
        out: the model's output on a batch of one sample.
        num_classes: the dataset's number of classes :math:`C`.

    Returns:
        A one-line reason, or ``None`` when ``out`` is a tensor of shape :math:`(1, C)`.
    """
    shape = tuple(getattr(out, "shape", ()))
    if not hasattr(out, "shape") or shape != (1, num_classes):
        what = f"shape {shape}" if hasattr(out, "shape") else type(out).__name__
        return (f"on one sample it returned {what}; the run needs logits of shape "
                f"(1, {num_classes}) (num_classes={num_classes})")
    return None
