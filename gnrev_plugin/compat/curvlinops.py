"""curvlinops' private API used by :mod:`gnrev_plugin.metrics` and
:mod:`gnrev_plugin.hosts.curvlinops`.

Checked against ``curvlinops-for-pytorch`` 3.0.1 (pinned in ``pyproject.toml``).

* :class:`PyTorchLinearOperator` and :class:`CurvatureLinearOperator` live in
  ``curvlinops._torch_base`` and are not exported at the package top level; gnrev's operators
  (NME surrogate, NTK, GN step) subclass them so they compose with curvlinops' own (``+``,
  ``-``, ``@``, ``to_scipy()``) and run through its estimators.
"""

from __future__ import annotations

from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator

CHECKED_VERSION = "3.0.1"

__all__ = ["CHECKED_VERSION", "CurvatureLinearOperator", "PyTorchLinearOperator"]
