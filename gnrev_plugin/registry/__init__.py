"""The plugin registry: hook specifications, the registry, discovery, contracts, built-in entries.

Hosts (training loops, benchmark runners, test suites) call::

    from gnrev_plugin.registry import get_registry
    reg = get_registry()                                   # discovers every installed plugin once
    model = reg.get_model("gnrev.revmlp", in_features=784, hidden=2000, num_blocks=2,
                          num_classes=10)
    opt = reg.get_optimizer("gnrev.exact_gn", model.parameters(), lr=1.0, loss="cross_entropy")
    "gauss_newton" in reg.optimizer_tags("exact_gn")       # capabilities as data
    for entry in reg.list():                               # every name with the distribution behind it
        print(entry.kind, entry.name, entry.distribution, entry.tags)

One module per concept: :mod:`~gnrev_plugin.registry.hookspecs` (the pluggy hooks and their
factory contracts), :mod:`~gnrev_plugin.registry.contracts` (the checks of those contracts and of
an entry's fields), :mod:`~gnrev_plugin.registry.registry` (entries and the name tables),
:mod:`~gnrev_plugin.registry.discovery` (entry points → a filled registry),
:mod:`~gnrev_plugin.registry.errors`, and :mod:`~gnrev_plugin.registry.builtin` (gnrev-plugin's
own plugin, found through the same entry-point group as any other).
"""

from __future__ import annotations

from .contracts import KINDS, METRIC_PROTOCOLS, OPTIMIZER_NEEDS, TAGS, check_factory_contract
from .discovery import discover, get_registry
from .errors import DuplicateNameError, PluginError, PluginWarning, UnknownNameError
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, hookimpl, hookspec
from .registry import Entry, LazyFactory, PluginProblem, PluginSource, Registry

__all__ = [
    "PROJECT", "ENTRY_POINT_GROUP", "KINDS", "TAGS", "hookimpl", "hookspec", "Entry", "PluginSource",
    "PluginProblem", "PluginError", "PluginWarning", "DuplicateNameError", "UnknownNameError", "Registry",
    "LazyFactory", "discover", "get_registry", "OPTIMIZER_NEEDS", "METRIC_PROTOCOLS",
    "check_factory_contract",
]
