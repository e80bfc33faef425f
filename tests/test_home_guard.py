"""The session's HOME guard (``tests/home_guard.py``): tests never write to the real HOME."""

import os
from pathlib import Path

from home_guard import home_writes

from gnrev_plugin.hosts.benchopt import solver_cache_dir, solver_path


def test_the_session_home_and_cache_are_temporary(tmp_path):
    home = Path(os.environ["HOME"])
    assert home.name.startswith("gnrev-test-home-") and Path.home() == home
    # the benchopt solver cache is this test's own folder, not ~/.cache/gnrev-plugin
    path = solver_path("sgd")
    assert Path(os.environ["GNREV_CACHE_DIR"]) in path.parents
    assert home not in path.parents and solver_cache_dir() == path.parent


def test_home_writes_lists_files_outside_the_allowed_caches(tmp_path):
    """Planted: ``home_writes`` returning ``[]`` -> this test fails (and the session check never
    fires)."""
    (tmp_path / ".cache" / "matplotlib").mkdir(parents=True)
    (tmp_path / ".cache" / "matplotlib" / "fontlist.json").write_text("{}")
    assert home_writes(tmp_path) == []
    (tmp_path / ".cache" / "gnrev-plugin" / "benchopt-solvers").mkdir(parents=True)
    (tmp_path / ".cache" / "gnrev-plugin" / "benchopt-solvers" / "gnrev_sgd.py").write_text("")
    assert home_writes(tmp_path) == [".cache/gnrev-plugin/benchopt-solvers/gnrev_sgd.py"]
