"""The repo's toy third-party plugin (``tests/fixtures/gnrev_toy_plugin``), installed for real.

Two ways, both as a user's machine would have it: :func:`install_dist_info` lays the package and
a hand-written ``*.dist-info`` (``METADATA`` + ``entry_points.txt``, what pip leaves in
``site-packages``) into a directory that goes on ``sys.path``; :func:`pip_install` runs
``pip install --target`` on the fixture (no network, no build isolation). The fixture
:func:`toy_registry` installs the first way and rediscovers the process registry.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gnrev_plugin.registry import get_registry

TOY = Path(__file__).resolve().parent / "fixtures" / "gnrev_toy_plugin"


def write_dist(root: Path, dist: str, version: str, entry_points: dict[str, str],
               modules: dict[str, str]) -> None:
    """An installed distribution as pip leaves it: package files + ``<dist>-<v>.dist-info``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[gnrev.plugins]\n{eps}\n")
    for relpath, src in modules.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))


def install_dist_info(site: Path) -> Path:
    """The toy plugin's package and dist-info in ``site`` (put it on ``sys.path``)."""
    shutil.copytree(TOY / "gnrev_toy", site / "gnrev_toy")
    write_dist(site, "gnrev-toy-plugin", "0.3.1", {"toy": "gnrev_toy.plugin"}, {})
    return site


def forget_toy_modules() -> None:
    for mod in [m for m in sys.modules if m == "gnrev_toy" or m.startswith("gnrev_toy.")]:
        del sys.modules[mod]


def pip_install(workdir: Path) -> Path:
    """``pip install --target`` of the toy plugin; returns the target directory."""
    src, target = workdir / "src", workdir / "site"
    shutil.copytree(TOY, src)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    return target


@pytest.fixture
def toy_registry(tmp_path, monkeypatch):
    """The toy plugin installed as a dist-info on ``sys.path``; the process registry is
    rediscovered (and restored afterwards)."""
    monkeypatch.syspath_prepend(str(install_dist_info(tmp_path / "site")))
    reg = get_registry(refresh=True)
    assert "toy.sign_sgd" in reg.names("optimizer")
    yield reg
    monkeypatch.undo()
    forget_toy_modules()
    get_registry(refresh=True)
