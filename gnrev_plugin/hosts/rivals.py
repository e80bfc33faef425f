"""Rivals: other packages' optimizers in the registry, built from those packages' own code.

A plugin of its own (entry point ``rivals = "gnrev_plugin.hosts.rivals"``, extra
``pip install "gnrev-plugin[rivals]"``) that registers, under the providing package's prefix:

==============================  ===========================================  ===================
name                            the package's class                          needs
==============================  ===========================================  ===================
``pytorch_optimizer.soap``      ``SOAP`` (Adam in Shampoo's eigenbasis)      —
``pytorch_optimizer.shampoo``   ``Shampoo`` (Kronecker ``L^{-1/4} G R^{-1/4}``)  —
``pytorch_optimizer.kron``      ``Kron`` (PSGD with Kronecker preconditioner)  —
``pytorch_optimizer.muon``      ``Muon`` (hidden matrices) + its AdamW groups  model
``pytorch_optimizer.adamw``     ``AdamW`` (``torch.optim.AdamW``, re-exported)  —
==============================  ===========================================  ===================

Why ``pytorch-optimizer`` (4.1.0): every class above is plain PyTorch (no ``torch.compile``, no
Triton, no custom kernels), so it steps identically on CPU and GPU without a compiler, and the
package is pinned in the extra. ``heavyball`` (3.2.1) is compile-first: its fused steps are
written for ``torch.compile``, which needs a C++ compiler / Triton that CPU-only CI machines and
this project's runners do not guarantee.

Muon only orthogonalises *hidden* weight matrices: the weights of every ``nn.Linear``/``nn.Conv*``
except the first and the last one (input embedding and classifier head, Jordan et al.'s
recommendation); biases, other 1-D parameters and those two layers go to the package's AdamW
fallback groups (``use_muon=False``).

Each entry's defaults live in :data:`gnrev_plugin.defaults.OPTIMIZER_DEFAULTS`; the options an
entry takes are the package class's named keyword arguments (:func:`accepted_options`); an unknown
option is an error here (the package's classes would swallow it through ``**kwargs``). When the
package is missing, the entries are still registered, marked unavailable in their description,
and building one raises :class:`~gnrev_plugin.registry.PluginError` with the install hint.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Iterable

from torch import nn

from ..defaults import OPTIMIZER_DEFAULTS
from ..registry import LazyFactory, PluginError, hookimpl

__all__ = ["PACKAGE", "PINNED_VERSION", "INSTALL_HINT", "RIVALS", "available", "accepted_options",
           "build_rival", "muon_param_groups", "gnrev_register_optimizers"]

PACKAGE = "pytorch_optimizer"
PINNED_VERSION = "4.1.0"
INSTALL_HINT = "pip install 'gnrev-plugin[rivals]'  (pytorch-optimizer==4.1.0)"

#: name → (class in :data:`PACKAGE`, description, needs)
RIVALS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pytorch_optimizer.soap": ("SOAP", "SOAP: Adam in the eigenbasis of Shampoo's factors", ()),
    "pytorch_optimizer.shampoo": ("Shampoo", "Shampoo: L^(-1/4) G R^(-1/4) Kronecker preconditioner",
                                  ()),
    "pytorch_optimizer.kron": ("Kron", "PSGD-Kron: preconditioned SGD, Kronecker-factored Q", ()),
    "pytorch_optimizer.muon": ("Muon", "Muon on hidden matrices; AdamW on the rest (package's groups)",
                               ("model",)),
    "pytorch_optimizer.adamw": ("AdamW", "AdamW (torch.optim.AdamW as pytorch_optimizer exports it)", ()),
}


def available() -> bool:
    """Whether :data:`PACKAGE` can be imported."""
    return importlib.util.find_spec(PACKAGE) is not None


def _class(name: str) -> type:
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError as err:
        raise PluginError(f"{name} is unavailable: the package pytorch-optimizer is not installed; "
                          f"{INSTALL_HINT}") from err
    return getattr(module, RIVALS[name][0])


def accepted_options(name: str) -> list[str]:
    """The hyperparameters rival ``name`` takes: its class's named keyword arguments.

    Args:
        name: a key of :data:`RIVALS`.

    Returns:
        The option names (without ``params`` and ``**kwargs``).
    """
    sig = inspect.signature(_class(name))
    return [p.name for p in sig.parameters.values()
            if p.name != "params" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def muon_param_groups(params: Iterable, model: nn.Module) -> list[dict]:
    """Muon's two kinds of groups: hidden weight matrices (``use_muon=True``) and the rest.

    Args:
        params: the parameters to optimize.
        model: the module owning them.

    Returns:
        ``[{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]`` (empty
        groups dropped).
    """
    params = list(params)
    layers = [m for m in model.modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    hidden_ids = {id(m.weight) for m in layers[1:-1]}
    hidden = [p for p in params if id(p) in hidden_ids and p.ndim >= 2]
    rest = [p for p in params if not (id(p) in hidden_ids and p.ndim >= 2)]
    groups = [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]
    return [g for g in groups if g["params"]]


def build_rival(name: str, params: Iterable, /, *, model: nn.Module | None = None, **options):
    """The package's optimizer for rival ``name`` (the registry's factory, ``name`` bound).

    Args:
        name: a key of :data:`RIVALS`.
        params: the parameters to optimize.
        model: the module (Muon only, to find its hidden layers).
        **options: hyperparameters; each must be one :func:`accepted_options` lists.

    Returns:
        A ``torch.optim.Optimizer`` of the package.
    """
    cls = _class(name)
    unknown = sorted(set(options) - set(accepted_options(name)))
    if unknown:
        raise TypeError(f"{name} does not take {unknown}; it takes {accepted_options(name)}")
    if RIVALS[name][0] == "Muon":
        if model is None:
            raise ValueError(f"{name} needs model= to tell hidden matrices from the rest")
        return cls(muon_param_groups(params, model), **options)
    return cls(params, **options)


class _RivalFactory(LazyFactory):
    """:func:`build_rival` with the name bound; resolving it imports the package (so
    ``gnrev list --check`` reports a missing package as unavailable)."""

    def __init__(self, name: str) -> None:
        super().__init__("gnrev_plugin.hosts.rivals:build_rival", name)

    def resolve(self):
        _class(self.args[0])
        return super().resolve()


@hookimpl
def gnrev_register_optimizers(registry) -> None:
    """Register every rival; marked unavailable (with the install hint) without the package."""
    missing = "" if available() else f"UNAVAILABLE ({INSTALL_HINT}): "
    for name, (_, doc, needs) in RIVALS.items():
        registry.add_optimizer(name, _RivalFactory(name), missing + doc,
                               defaults=OPTIMIZER_DEFAULTS.get(name), needs=needs)
