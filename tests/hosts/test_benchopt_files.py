"""benchopt runner files that need no benchopt: the shipped benchmark folder, the generated
solver files (one per registry optimizer), ``gnrev benchopt init`` and ``gnrev benchopt
solver-path``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.hosts.benchopt import (
    benchmark_dir,
    solver_file_name,
    solver_path,
    solver_source,
)
from gnrev_plugin.registry import UnknownNameError, get_registry


@pytest.fixture(autouse=True)
def _solver_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNREV_CACHE_DIR", str(tmp_path / "cache"))


def test_shipped_benchmark_layout():
    bench = benchmark_dir()
    assert (bench / "objective.py").is_file()
    assert {p.stem for p in (bench / "datasets").glob("*.py")} == {"simulated", "mnist", "mnist1d"}
    assert not list(bench.glob("solvers/*.py"))  # solvers are written per registry optimizer


@pytest.mark.parametrize("name", ["gnrev.exact_gn", "toy.sign_sgd", "a-b.c"])
def test_solver_file_builds_the_solver_by_registry_name(name):
    tree = ast.parse(solver_source(name))
    [assign] = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert assign.targets[0].id == "Solver"
    assert ast.literal_eval(assign.value.args[0]) == name and assign.value.func.id == "make_solver"
    file_name = solver_file_name(name)
    assert file_name.endswith(".py") and file_name[:-3].isidentifier()


@pytest.mark.parametrize("name, registered", [("gnrev.exact_gn", "gnrev.exact_gn"),
                                              ("exact_gn", "gnrev.exact_gn"),
                                              ("dense-gn", "gnrev.dense_gn"), ("adam", "gnrev.adam")])
def test_solver_path_resolves_registry_names(name, registered, tmp_path):
    path = solver_path(name)
    assert path.is_absolute() and path.is_file()
    assert path.parent == (tmp_path / "cache" / "benchopt-solvers").resolve()
    assert path.read_text() == solver_source(registered)


def test_solver_path_unknown_name_lists_the_registered_optimizers():
    with pytest.raises(UnknownNameError, match="known optimizers: gnrev.adam, gnrev.dense_gn"):
        solver_path("lbfgs")


def test_cli_init_writes_the_benchmark_and_one_solver_per_registered_optimizer(tmp_path, capsys):
    dest = tmp_path / "bench"
    assert gnrev_main(["benchopt", "init", str(dest)]) == 0
    src = benchmark_dir()
    shipped = sorted(p.relative_to(src) for p in src.rglob("*.py") if "__pycache__" not in p.parts)
    for rel in shipped:
        assert (dest / rel).read_text() == (src / rel).read_text()
    names = get_registry().names("optimizer")
    solvers = sorted(p.name for p in (dest / "solvers").glob("*.py"))
    assert solvers == sorted(solver_file_name(n) for n in names)
    for n in names:
        assert (dest / "solvers" / solver_file_name(n)).read_text() == solver_source(n)
    # refuses to overwrite without --force, then overwrites with it
    assert gnrev_main(["benchopt", "init", str(dest)]) == 2
    assert "already holds a benchmark" in capsys.readouterr().err
    (dest / "objective.py").write_text("# edited\n")
    assert gnrev_main(["benchopt", "init", str(dest), "--force"]) == 0
    assert (dest / "objective.py").read_text() == (src / "objective.py").read_text()
    capsys.readouterr()
    assert gnrev_main(["benchopt", "solver-path", "exact_gn"]) == 0
    assert Path(capsys.readouterr().out.strip()) == solver_path("gnrev.exact_gn")
    assert gnrev_main(["benchopt", "solver-path", "nope"]) == 2
    assert "known optimizers" in capsys.readouterr().err
