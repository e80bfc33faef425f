"""The pluggy hook specifications of the ``gnrev`` plugin system.

A plugin is any importable module (or object) listed under the entry-point group
``gnrev.plugins`` that implements some of these hooks, marked with
``pluggy.HookimplMarker("gnrev")`` (re-exported as :data:`gnrev_plugin.plugins.hookimpl`)::

    # pyproject.toml of a third-party distribution
    [project.entry-points."gnrev.plugins"]
    myplugin = "my_package.gnrev_plugin"

    # my_package/gnrev_plugin.py
    import pluggy
    hookimpl = pluggy.HookimplMarker("gnrev")

    @hookimpl
    def gnrev_register_models(registry):
        registry.add_model("my.net", "my_package.models:build_net", description="...")

Hooks only *register* names; nothing is built or imported until a host asks for it
(:meth:`~gnrev_plugin.plugins.Registry.get_model` and friends). Every hook receives the same
:class:`~gnrev_plugin.plugins.Registry`, which records the plugin and distribution behind every
entry.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT", "ENTRY_POINT_GROUP", "hookspec", "hookimpl", "GnrevHookSpecs"]

#: The pluggy project name (the marker name plugins use).
PROJECT = "gnrev"
#: The entry-point group scanned for plugins (``[project.entry-points."gnrev.plugins"]``).
ENTRY_POINT_GROUP = "gnrev.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GnrevHookSpecs:
    """Registration hooks. Each is called once per plugin with the host's registry."""

    @hookspec
    def gnrev_register_models(self, registry) -> None:
        """Add model factories: ``registry.add_model(name, factory, description=...)``.

        ``factory(**cfg)`` must return an ``nn.Module``; ``factory`` may be a callable or a
        lazy ``"module:attribute"`` string.
        """

    @hookspec
    def gnrev_register_optimizers(self, registry) -> None:
        """Add optimizer factories: ``registry.add_optimizer(name, factory)``.

        ``factory(params, **cfg)`` must return a ``torch.optim.Optimizer``-like object.
        """

    @hookspec
    def gnrev_register_metrics(self, registry) -> None:
        """Add metric callables: ``registry.add_metric(name, fn)``."""

    @hookspec
    def gnrev_register_datasets(self, registry) -> None:
        """Add dataset loaders: ``registry.add_dataset(name, loader)``; ``loader(**cfg)``."""
