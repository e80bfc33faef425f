"""Tests write only under temporary directories (issue 22, item 6).

For the whole session ``HOME`` (and ``XDG_CACHE_HOME``) point into a fresh temporary folder, so
a test that writes to ``~`` (``Path.home()``, ``~/.cache/gnrev-plugin/...``) cannot touch the
real one; at the end of the session anything written there except other tools' own caches
(:data:`ALLOWED`) fails the session, listed by path. Each test also gets its own
``GNREV_CACHE_DIR`` (the benchopt solver cache, :func:`gnrev_plugin.hosts.benchopt.solver_cache_dir`)
under its temporary directory (fixture ``_gnrev_cache_in_tmp`` in ``conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

#: Caches of third-party tools (matplotlib's font list, ...) that may appear under the session's
#: HOME; anything else written there is a test writing outside its temporary directory.
ALLOWED = (".cache/matplotlib", ".config/matplotlib", ".cache/fontconfig", ".cache/torch",
           ".triton",
           ".keras",      # Keras writes keras.json on import (TensorFlow, in AlgoPerf's runner)
           ".rustup")     # rustup's proxies write settings.toml on first use (a build tool)


def home_writes(home: Path, allowed: tuple[str, ...] = ALLOWED) -> list[str]:
    """Files under ``home`` that are not in an allowed folder.

    Args:
        home: the session's temporary HOME.
        allowed: folders (relative to ``home``) other tools may write.

    Returns:
        Their paths relative to ``home``, sorted.
    """
    found = []
    for p in sorted(home.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(home).as_posix()
        if not any(rel == a or rel.startswith(a + "/") for a in allowed):
            found.append(rel)
    return found


_SAVED: dict[str, str | None] = {}
_FAKE: list[Path] = []


def pytest_configure(config):
    fake = Path(tempfile.mkdtemp(prefix="gnrev-test-home-"))
    _FAKE.append(fake)
    for key, value in (("HOME", fake), ("XDG_CACHE_HOME", fake / ".cache")):
        _SAVED[key] = os.environ.get(key)
        os.environ[key] = str(value)


def pytest_sessionfinish(session, exitstatus):
    if not _FAKE:
        return
    fake = _FAKE.pop()
    written = home_writes(fake)
    for key, value in _SAVED.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(fake, ignore_errors=True)
    if written:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        msg = ("tests wrote under $HOME (redirected to a temporary folder for the session; they "
               "would have written to the real one): " + ", ".join(f"~/{w}" for w in written)
               + "; write under tmp_path instead")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(msg, red=True)
        else:  # pragma: no cover
            print(msg)
