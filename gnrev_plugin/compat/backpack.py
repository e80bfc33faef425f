"""BackPACK's private API used by :mod:`gnrev_plugin.hosts.backpack`.

Checked against ``backpack-for-pytorch`` 1.7.1.

* :func:`module_extensions`: a ``BackpropExtension`` keeps its ``{module class: ModuleExtension}``
  table in the name-mangled attribute ``_BackpropExtension__module_extensions``; gnrev reads it
  to reuse BackPACK's own ``nn.Linear`` rules inside the coupling blocks.
"""

from __future__ import annotations

from typing import Any

CHECKED_VERSION = "1.7.1"

__all__ = ["CHECKED_VERSION", "module_extensions"]


def module_extensions(extension: Any) -> dict:
    """The ``{module class: ModuleExtension}`` table of a BackPACK extension instance (empty if
    the attribute is missing, e.g. after a BackPACK release renamed it)."""
    return getattr(extension, "_BackpropExtension__module_extensions", {})
