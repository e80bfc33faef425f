"""benchopt adapter: every registered optimizer as a benchopt solver, and a ready-made benchmark.

* :mod:`gnrev_plugin.hosts.benchopt.solvers` (imports benchopt): :func:`make_solver(name)
  <gnrev_plugin.hosts.benchopt.solvers.make_solver>` turns any registry optimizer into a benchopt
  solver class named exactly by its registry name, built through :mod:`gnrev_plugin.build`.
* ``benchmark/`` (package data): a complete benchopt benchmark (objective, MNIST / MNIST-1D /
  simulated datasets). :func:`init_benchmark` copies it for a user (``gnrev benchopt init DIR``)
  and writes one solver file per registered optimizer into ``DIR/solvers`` (installed plugins
  included), so ``benchopt run DIR -s NAME`` selects any of them.
* :func:`solver_path` writes (into a per-user cache) and returns the solver file of one registry
  name, for benchopt's file selector: ``benchopt run BENCH -s "$(gnrev benchopt solver-path
  gnrev.exact_gn)[lr=0.5]"`` adds GN to any existing benchmark.

This module does not import benchopt, so the paths are available without it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gnrev_plugin.registry import Registry, get_registry

__all__ = ["BENCHMARK_DIR", "benchmark_dir", "solver_file_name", "solver_source", "solver_path",
           "init_benchmark", "solver_cache_dir"]

#: The benchmark folder shipped inside the package (objective and datasets).
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmark"


def benchmark_dir() -> Path:
    """The shipped benchmark folder (read-only in an installed package; copy it to edit)."""
    if not (BENCHMARK_DIR / "objective.py").is_file():
        raise FileNotFoundError(f"the shipped benchopt benchmark is missing from {BENCHMARK_DIR}; "
                                "reinstall gnrev-plugin (package data not installed?)")
    return BENCHMARK_DIR


def solver_file_name(name: str) -> str:
    """``gnrev.exact_gn`` → ``gnrev_exact_gn.py`` (benchopt imports solver files as modules)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) + ".py"


def solver_source(name: str) -> str:
    """The text of the solver file of registry optimizer ``name``."""
    return (f'"""benchopt solver for the gnrev registry optimizer {name!r}.\n\n'
            "Written by `gnrev benchopt init` / `gnrev benchopt solver-path`; the solver is built "
            "through\ngnrev's registry (gnrev_plugin.hosts.benchopt.solvers.make_solver).\n"
            '"""\n\n'
            "from gnrev_plugin.hosts.benchopt.solvers import make_solver\n\n"
            f"Solver = make_solver({name!r})\n")


def solver_cache_dir() -> Path:
    """Where :func:`solver_path` writes solver files (``$GNREV_CACHE_DIR/benchopt-solvers``, else
    ``$XDG_CACHE_HOME/gnrev-plugin/benchopt-solvers``, else ``~/.cache/...``)."""
    root = os.environ.get("GNREV_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gnrev-plugin"
    return Path(root) / "benchopt-solvers"


def _write_solver(folder: Path, name: str) -> Path:
    path = folder / solver_file_name(name)
    text = solver_source(name)
    if not path.exists() or path.read_text() != text:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def solver_path(name: str, registry: Registry | None = None) -> Path:
    """Absolute path of a solver file for registry optimizer ``name`` (``gnrev.`` optional for
    built-ins), written on demand into :func:`solver_cache_dir`. Unknown names raise
    :class:`~gnrev_plugin.registry.UnknownNameError` listing the registered optimizers."""
    reg = registry if registry is not None else get_registry()
    return _write_solver(solver_cache_dir(), reg.resolve_name("optimizer", name)).resolve()


def init_benchmark(dest: str | Path, overwrite: bool = False,
                   registry: Registry | None = None) -> Path:
    """Copy the shipped benchmark to ``dest`` and write one solver per registered optimizer.

    Raises:
        FileExistsError: if ``dest`` already holds an ``objective.py`` and ``overwrite`` is false.
    """
    reg = registry if registry is not None else get_registry()
    dest = Path(dest)
    if (dest / "objective.py").exists() and not overwrite:
        raise FileExistsError(f"{dest} already holds a benchmark (objective.py); pass --force to "
                              "overwrite its files")
    src = benchmark_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts or "outputs" in rel.parts or path.suffix == ".pyc":
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    for name in reg.names("optimizer"):
        _write_solver(dest / "solvers", name)
    return dest
