"""The rivals plugin's entry point for tests (beside ``toy_plugin.py``): a checkout whose editable
install predates the ``rivals`` entry point gets it from a dist-info on ``sys.path``, as pip lays
it; an install that has it (CI) is used as it is."""

from __future__ import annotations

import importlib.metadata as md
import sys

import pytest
from toy_plugin import write_dist

from gnrev_plugin.hosts import rivals
from gnrev_plugin.registry import get_registry

ENTRY_VALUE = "gnrev_plugin.hosts.rivals"


def needs_package() -> None:
    """Skip without pytorch-optimizer (under ``CI`` conftest turns the skip into a failure)."""
    if not rivals.available():
        pytest.skip(f"pytorch-optimizer is not installed: {rivals.INSTALL_HINT}")


@pytest.fixture(scope="module")
def rival_registry(tmp_path_factory):
    """The process registry with the ``rivals`` entry point. A checkout whose editable install
    predates the entry point gets it from a dist-info on ``sys.path`` (as pip would lay it)."""
    needs_package()
    installed = any(ep.value == ENTRY_VALUE for ep in md.entry_points(group="gnrev.plugins"))
    site = None
    if not installed:
        site = tmp_path_factory.mktemp("site")
        write_dist(site, "gnrev-rivals-entry-point", "0.0.0", {"rivals": ENTRY_VALUE}, {})
        sys.path.insert(0, str(site))
    reg = get_registry(refresh=True)
    yield reg
    if site is not None:
        sys.path.remove(str(site))
    get_registry(refresh=True)


