"""The registry's errors and warning: what a host catches when a plugin or an entry fails."""

from __future__ import annotations

__all__ = ["PluginError", "PluginWarning", "DuplicateNameError", "UnknownNameError"]


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
