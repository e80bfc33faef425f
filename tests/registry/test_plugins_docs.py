"""The copy-paste examples of ``docs/hosts/*.md`` run as written."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "hosts"
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["plugins.md", "curvlinops.md", "backpack.md"])
def test_examples_run(page, capsys):
    blocks = python_blocks(page)
    assert blocks, f"no python examples in {page}"
    namespace: dict = {"__name__": f"docs_{page[:-3]}"}
    for block in blocks:  # one namespace per page: later blocks use earlier names
        exec(compile(block, f"{page}", "exec"), namespace)
    out = capsys.readouterr().out
    if page == "curvlinops.md":
        errs = [float(v) for v in re.findall(r"max \|.*?\| = (\S+)", out)]
        assert len(errs) == 2 and max(errs) < 1e-10
    if page == "plugins.md":
        assert "gnrev.exact_gn" in out and "<not installed>" in out


def test_pytest_page_example_tests(gnrev_tiny_revmlp, gnrev_small_data, gnrev_contracts, capsys):
    (block,) = python_blocks("pytest.md")
    namespace: dict = {}
    exec(compile(block, "pytest.md", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test(copy.deepcopy(gnrev_tiny_revmlp), gnrev_small_data, gnrev_contracts)
    assert "SGD is not an exact Gauss-Newton step" in capsys.readouterr().out
