"""The layer contract (``[tool.importlinter]`` in ``pyproject.toml``) and the compat boundary.

* ``lint-imports`` on the package: compat ← core (nn, optim, metrics) ← registry/build/defaults/
  data ← engine, hosts ← experiments ← commands/cli/pytest_plugin, and host libraries imported
  only by their adapters;
* the same contract on a copy of the package with one planted upward import (the core importing
  ``gnrev_plugin.build``) must fail and name that import, so the contract can catch what it names;
* private modules and attributes of torch, curvlinops, BackPACK and DeepOBS appear only under
  ``gnrev_plugin/compat/``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gnrev_plugin"
HOSTS = ("torch", "curvlinops", "backpack", "deepobs", "cockpit")
#: Private attributes of host objects that only compat/ may touch.
FOREIGN_PRIVATE_ATTRS = {"_orig_mod", "_forward_hooks", "_backward_hooks", "_backpack_extend",
                         "_torch_base", "_fail_mode"}


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    if exe.exists():
        return str(exe)
    found = shutil.which("lint-imports")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("lint-imports is missing (install the test extra: import-linter)")
        pytest.skip("lint-imports is not installed (the test extra's import-linter)")
    return found


def _run_lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([_lint_imports(), "--no-cache", "--no-logo"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layer_contract_holds():
    res = _run_lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_layer_contract_fails_on_a_planted_upward_import(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "gnrev_plugin",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    revmlp = tmp_path / "gnrev_plugin" / "nn" / "revmlp.py"
    revmlp.write_text(revmlp.read_text() + "\nimport gnrev_plugin.build  # noqa: E402, F401\n")
    res = _run_lint(tmp_path)
    assert res.returncode != 0, res.stdout
    assert "gnrev_plugin.nn.revmlp -> gnrev_plugin.build" in res.stdout, res.stdout


def _private_uses(path: Path) -> list[str]:
    """``import host._x`` / ``from host._x import`` / ``host._x`` / ``obj.<foreign private>``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for mod in modules:
            parts = mod.split(".")
            if parts[0] in HOSTS and any(p.startswith("_") for p in parts[1:]):
                found.append(f"{path}:{node.lineno}: import {mod}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            host_name = isinstance(node.value, ast.Name) and node.value.id in HOSTS
            if host_name or node.attr in FOREIGN_PRIVATE_ATTRS:
                found.append(f"{path}:{node.lineno}: .{node.attr}")
    return found


def test_private_host_apis_only_in_compat():
    compat = PACKAGE / "compat"
    uses = [u for f in sorted(PACKAGE.rglob("*.py")) if compat not in f.parents
            for u in _private_uses(f)]
    assert not uses, "private host APIs outside gnrev_plugin/compat/:\n" + "\n".join(uses)


def test_private_use_detector_sees_each_form(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from curvlinops._torch_base import PyTorchLinearOperator\n"
                       "import torch._dynamo\n"
                       "x = torch._C\n"
                       "y = module._orig_mod\n")
    assert len(_private_uses(planted)) == 4
