"""benchopt adapter: exact Gauss-Newton as benchopt solvers, and a ready-made benchmark.

* :mod:`gnrev_plugin.hosts.benchopt.solvers` (imports benchopt): the solver classes ``ExactGN``,
  ``DenseGN``, ``Adam``, ``SGD`` on one torch base solver with per-epoch callback sampling.
* ``benchmark/`` (package data): a complete benchopt benchmark (objective, MNIST / MNIST-1D /
  simulated datasets, solver files that are one-line shims importing those classes).
* :func:`init_benchmark` copies that folder for a user (``gnrev benchopt init DIR``);
  :func:`solver_path` gives a shim's path for ``benchopt run BENCH -s PATH[lr=...]``, which adds GN
  to any existing benchmark (``gnrev benchopt solver-path ExactGN``).

This module does not import benchopt, so the paths are available without it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["BENCHMARK_DIR", "SOLVER_FILES", "benchmark_dir", "solver_path", "init_benchmark"]

#: The benchmark folder shipped inside the package.
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmark"

#: Solver class name → shim file in ``benchmark/solvers``.
SOLVER_FILES = {
    "ExactGN": "exact_gn.py",
    "DenseGN": "dense_gn.py",
    "Adam": "adam.py",
    "SGD": "sgd.py",
}


def benchmark_dir() -> Path:
    """The shipped benchmark folder (read-only in an installed package; copy it to edit)."""
    if not (BENCHMARK_DIR / "objective.py").is_file():
        raise FileNotFoundError(f"the shipped benchopt benchmark is missing from {BENCHMARK_DIR}; "
                                "reinstall gnrev-plugin (package data not installed?)")
    return BENCHMARK_DIR


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").removesuffix(".py")


def solver_path(name: str) -> Path:
    """Absolute path of the solver file for ``name`` (``ExactGN``, ``exact-gn``, ``exact_gn``, ...).

    Use it with benchopt's file selector: ``benchopt run BENCH -s "PATH[lr=0.1]"``.
    """
    wanted = _normalise(name)
    for cls_name, file_name in SOLVER_FILES.items():
        if wanted in (_normalise(cls_name), _normalise(file_name)):
            return benchmark_dir() / "solvers" / file_name
    raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVER_FILES)}")


def init_benchmark(dest: str | Path, overwrite: bool = False) -> Path:
    """Copy the shipped benchmark to ``dest`` (created) and return its path.

    Raises:
        FileExistsError: if ``dest`` already holds an ``objective.py`` and ``overwrite`` is false.
    """
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
    return dest
