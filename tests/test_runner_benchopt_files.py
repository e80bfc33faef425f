"""benchopt runner files that need no benchopt: the shipped benchmark folder, its one-line solver
shims, ``gnrev benchopt init`` and ``gnrev benchopt solver-path``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.hosts.benchopt import SOLVER_FILES, benchmark_dir, solver_path


def test_shipped_benchmark_layout_and_shims():
    bench = benchmark_dir()
    assert (bench / "objective.py").is_file()
    assert {p.stem for p in (bench / "datasets").glob("*.py")} == {"simulated", "mnist", "mnist1d"}
    for cls_name, file_name in SOLVER_FILES.items():
        lines = (bench / "solvers" / file_name).read_text().strip().splitlines()
        assert lines == [f"from gnrev_plugin.hosts.benchopt.solvers import {cls_name} as Solver"
                         "  # noqa: F401"]


@pytest.mark.parametrize("name, file_name", [("ExactGN", "exact_gn.py"), ("exact-gn", "exact_gn.py"),
                                             ("dense_gn", "dense_gn.py"), ("adam", "adam.py"),
                                             ("SGD.py", "sgd.py")])
def test_solver_path_resolves_names(name, file_name):
    path = solver_path(name)
    assert path.is_absolute() and path.is_file() and path.name == file_name


def test_solver_path_unknown_name_is_clear():
    with pytest.raises(ValueError, match="known: ExactGN, DenseGN, Adam, SGD"):
        solver_path("lbfgs")


def test_cli_init_and_solver_path(tmp_path, capsys):
    dest = tmp_path / "bench"
    assert gnrev_main(["benchopt", "init", str(dest)]) == 0
    src = benchmark_dir()
    shipped = sorted(p.relative_to(src) for p in src.rglob("*.py") if "__pycache__" not in p.parts)
    written = sorted(p.relative_to(dest) for p in dest.rglob("*.py"))
    assert written == shipped
    for rel in shipped:
        assert (dest / rel).read_text() == (src / rel).read_text()
    # refuses to overwrite without --force, then overwrites with it
    assert gnrev_main(["benchopt", "init", str(dest)]) == 2
    assert "already holds a benchmark" in capsys.readouterr().err
    (dest / "objective.py").write_text("# edited\n")
    assert gnrev_main(["benchopt", "init", str(dest), "--force"]) == 0
    assert (dest / "objective.py").read_text() == (src / "objective.py").read_text()
    capsys.readouterr()
    assert gnrev_main(["benchopt", "solver-path", "ExactGN"]) == 0
    assert Path(capsys.readouterr().out.strip()) == solver_path("ExactGN")


